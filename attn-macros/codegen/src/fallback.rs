//! What to emit when a declaration has errors: the errors, plus a stub for each layer whose
//! shapes are broken (layers with correct shapes are expanded normally, see
//! `validate_recovering`), so that code using a layer does not add a cascade of "cannot find"
//! errors. The stub takes the declared inputs as any type.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::ir::Layer;
use crate::parse::{Input, LayerSyntax, Term};

/// The errors, and a stub for each layer of `input` that is not among the `expanded` ones.
pub fn expand(input: &Input, expanded: &[Layer], error: syn::Error) -> TokenStream {
    let errors = error.into_compile_error();
    let mut stubbed: Vec<&syn::Ident> = expanded.iter().map(|layer| &layer.ident).collect();
    let mut stubs = TokenStream::new();
    for layer in &input.layers {
        if !stubbed.contains(&&layer.ident) {
            stubs.extend(stub(layer));
            stubbed.push(&layer.ident);
        }
    }
    quote! {
        #errors
        #stubs
    }
}

fn has(layer: &LayerSyntax, key: &str) -> bool {
    layer.entries.iter().any(|entry| entry.key == key)
}

fn has_mask_tensor(layer: &LayerSyntax) -> bool {
    layer.entries.iter().any(|entry| {
        entry.key == "mask"
            && entry
                .value
                .terms
                .iter()
                .any(|term| matches!(term, Term::Shape(_)))
    })
}

fn has_mask_term(layer: &LayerSyntax, name: &str) -> bool {
    layer.entries.iter().any(|entry| {
        entry.key == "mask"
            && entry
                .value
                .terms
                .iter()
                .any(|term| matches!(term, Term::Ident(ident) if ident == name))
    })
}

/// The errors, and a stub for each projection layer of `input` not among the `expanded` ones:
/// `struct Name;` whose constructors, `forward`, `prefill` and `decode` take anything.
pub fn expand_projections(
    input: &Input,
    expanded: &[crate::layer::ProjectionLayer],
    error: syn::Error,
) -> TokenStream {
    let errors = error.into_compile_error();
    let mut stubbed: Vec<&syn::Ident> = expanded.iter().map(|layer| &layer.ident).collect();
    let mut stubs = TokenStream::new();
    for layer in &input.layers {
        if stubbed.contains(&&layer.ident) {
            continue;
        }
        stubbed.push(&layer.ident);
        let vis = &layer.vis;
        let ident = &layer.ident;
        let mut names = vec!["inputs_q"];
        for name in ["inputs_k", "inputs_v"] {
            if has(layer, name) {
                names.push(name);
            }
        }
        if has_mask_tensor(layer) {
            names.push("mask");
        }
        let types: Vec<_> = (0..names.len()).map(|i| format_ident!("T{}", i)).collect();
        let args = names.iter().map(|name| format_ident!("_{}", name));
        let unreachable = quote!(::core::unreachable!(
            "the `attention!` declaration of this layer has errors"
        ));
        let result = quote!(::core::result::Result<R, ::attn::__private::AttnError>);
        // The cache type too, so that code creating one adds no "cannot find type" error.
        let cache = layer
            .entries
            .iter()
            .find(|entry| entry.key == "cache")
            .map(|entry| {
                let cache_ident = format_ident!("{}Cache", ident);
                let dynamic = matches!(
                    entry.value.terms.as_slice(),
                    [Term::Ident(word)] if word == "dynamic"
                );
                let new = if dynamic {
                    quote!(
                        pub fn new(_capacity: usize) -> Self {
                            Self
                        }
                    )
                } else {
                    quote!(
                        pub fn new() -> Self {
                            Self
                        }
                    )
                };
                quote! {
                    #vis struct #cache_ident;
                    impl #cache_ident {
                        #new
                        pub fn len(&self) -> usize { #unreachable }
                    }
                }
            });
        stubs.extend(quote! {
            #cache
            #vis struct #ident;
            impl #ident {
                pub fn new<R>(_seed: u64) -> #result { #unreachable }
                pub fn from_msgpack<R>(_bytes: &[u8], _path: &str) -> #result { #unreachable }
                pub fn from_safetensors<R>(_bytes: &[u8], _path: &str) -> #result { #unreachable }
                #[allow(clippy::too_many_arguments)]
                pub fn forward<#(#types,)* R>(
                    &self,
                    #(#args: #types,)*
                    _ctx: &mut ::attn::__private::Context<'_>,
                ) -> #result { #unreachable }
                pub fn prefill<C, T, R>(
                    &self,
                    _cache: C,
                    _prompt: T,
                    _ctx: &mut ::attn::__private::Context<'_>,
                ) -> #result { #unreachable }
                pub fn decode<C, T, R>(
                    &self,
                    _cache: C,
                    _token: T,
                    _ctx: &mut ::attn::__private::Context<'_>,
                ) -> #result { #unreachable }
            }
        });
    }
    quote! {
        #errors
        #stubs
    }
}

/// `struct Name;` with `weights` and `forward` taking the declared inputs as any type.
fn stub(layer: &LayerSyntax) -> TokenStream {
    let vis = &layer.vis;
    let ident = &layer.ident;
    let mut names = vec!["query", "key"];
    if has(layer, "bias") {
        names.push("bias");
    }
    if has_mask_tensor(layer) {
        names.push("mask");
    }
    for (term, inputs) in [
        ("query_lengths", &["query_lengths"][..]),
        ("kv_lengths", &["kv_lengths"][..]),
        ("segment_ids", &["query_segment_ids", "kv_segment_ids"][..]),
    ] {
        if has_mask_term(layer, term) {
            names.extend(inputs);
        }
    }
    let method = |name: &str, inputs: &[&str]| {
        let name = format_ident!("{}", name);
        let types: Vec<_> = (0..inputs.len()).map(|i| format_ident!("T{}", i)).collect();
        let args = inputs.iter().map(|input| format_ident!("_{}", input));
        quote! {
            #[allow(clippy::too_many_arguments)]
            pub fn #name<#(#types,)* R>(
                &self,
                #(#args: #types,)*
                _ctx: &mut ::attn::__private::Context<'_>,
            ) -> ::core::result::Result<R, ::attn::__private::AttnError> {
                ::core::unreachable!("the `attention!` declaration of this layer has errors")
            }
        }
    };
    let weights = method("weights", &names);
    let mut forward_inputs = names.clone();
    forward_inputs.insert(2, "value");
    let forward = has(layer, "value").then(|| method("forward", &forward_inputs));
    quote! {
        #vis struct #ident;
        impl #ident {
            #weights
            #forward
        }
    }
}
