//! Training for projection layers: the layer's `vjp` method (the forward that keeps what the
//! backward needs) and the `NamePullback` type whose `backward` returns the gradients of the
//! inputs, each typed with its input's shape, and of every parameter.

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

use super::expand::{
    causal_tokens, ctx_tokens, docs, elem, generics, mask_tokens, same_dims, shape_text,
    shape_type, usize_lit, view_params,
};
use super::{Input, ProjectionLayer};
use crate::ir::Axis;

/// The name of the pullback type of `layer`: `NamePullback`.
pub(super) fn pullback_ident(layer: &ProjectionLayer) -> Ident {
    let name = layer.ident.to_string();
    format_ident!("{}Pullback", name.trim_start_matches("r#"))
}

/// The inputs of the layer that get gradients, in order.
fn float_inputs(layer: &ProjectionLayer) -> Vec<&Input> {
    [
        Some(&layer.inputs_q),
        layer.inputs_k.as_ref(),
        layer.inputs_v.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The output's axes: `inputs_q`'s batch dims and length, then `out_features`.
fn output_axes(layer: &ProjectionLayer) -> Vec<Axis> {
    let batch = layer.inputs_q.axes.len() - 2;
    let mut axes = layer.inputs_q.axes[..=batch].to_vec();
    axes.push(Axis::Size(layer.out_features));
    axes
}

/// `vjp`, a method of the layer.
pub(super) fn vjp_fn(layer: &ProjectionLayer) -> TokenStream {
    let inputs: Vec<&Input> = float_inputs(layer)
        .into_iter()
        .chain(layer.mask.as_ref())
        .collect();
    let names = generics(layer, inputs.iter().copied());
    let pullback_names = generics(layer, float_inputs(layer));
    let pullback = pullback_ident(layer);
    let out_elem = elem(layer.output_dtype());
    let (args, shapes) = view_params(layer, &inputs, &quote!('a));
    let checks = same_dims(layer, &inputs);
    let borrow = |input: Option<&Input>| match input {
        Some(input) => {
            let name = format_ident!("{}", input.name);
            quote!(::core::option::Option::Some(::attn::__private::view_ref_owned(#name)?))
        }
        None => quote!(::core::option::Option::None),
    };
    let (k_ref, v_ref) = (
        borrow(layer.inputs_k.as_ref()),
        borrow(layer.inputs_v.as_ref()),
    );
    let (mask_let, mask_ref) = mask_tokens(layer);
    let causal = causal_tokens(layer);
    let batch = layer.inputs_q.axes.len() - 2;
    let out_dims = (0..=batch).map(|i| {
        let index = syn::Index::from(i);
        quote!(inputs_q_shape.#index)
    });
    let out = usize_lit(layer.out_features);
    let out_shape_ty = shape_type(layer, &output_axes(layer));
    let saved_shapes = float_inputs(layer).into_iter().map(|input| {
        let name = format_ident!("{}", input.name);
        let shape = format_ident!("{}_shape", input.name);
        quote!(#name: #shape,)
    });
    let ctx = ctx_tokens(layer);
    let method_docs = docs([
        "[`Self::forward`] for training: the output, and the pullback whose `backward` maps the \
         output's cotangent to the gradients of the inputs and of every parameter (`jax.vjp` \
         of `module.apply`)."
            .to_owned(),
        String::new(),
        format!(
            "Same arguments as [`Self::forward`]; the inputs stay borrowed by the pullback. \
             Pass its `backward` a `ctx` with this call's dropout RNG: dropout is regenerated, \
             never stored. See [`{pullback}::backward`]."
        ),
        String::new(),
        "# Errors".to_owned(),
        String::new(),
        "As [`Self::forward`].".to_owned(),
    ]);
    quote! {
        #method_docs
        pub fn vjp<'a, #(#names,)*>(
            &'a self,
            #(#args,)*
            ctx: &mut ::attn::__private::Context<'_>,
        ) -> ::core::result::Result<
            (
                ::attn::__private::Tensor<#out_elem, #out_shape_ty>,
                #pullback<'a, #(#pullback_names,)*>,
            ),
            ::attn::__private::AttnError,
        >
        where
            #(#names: ::attn::__private::Dim,)*
        {
            #(#shapes)*
            #(#checks)*
            #mask_let
            let (output, pullback) = self.layer.vjp(
                ::attn::__private::view_ref_owned(inputs_q)?,
                #k_ref,
                #v_ref,
                #mask_ref,
                #causal,
                #ctx,
            )?;
            let output_shape = (#(#out_dims,)* ::attn::__private::Const::<#out>);
            let output = ::attn::__private::typed("output", output, output_shape)?;
            ::core::result::Result::Ok((
                output,
                #pullback {
                    pullback,
                    #(#saved_shapes)*
                    output: output_shape,
                },
            ))
        }
    }
}

/// The type `NamePullback` and its `backward`.
pub(super) fn pullback_items(layer: &ProjectionLayer, allow: Option<&TokenStream>) -> TokenStream {
    let ident = &layer.ident;
    let vis = &layer.vis;
    let pullback = pullback_ident(layer);
    let names = generics(layer, float_inputs(layer));
    let in_elem = elem(layer.input_dtype());
    let out_elem = elem(layer.output_dtype());
    let out_axes = output_axes(layer);
    let out_shape_ty = shape_type(layer, &out_axes);
    let fields = float_inputs(layer).into_iter().map(|input| {
        let name = format_ident!("{}", input.name);
        let shape = shape_type(layer, &input.axes);
        let doc = format!(" The shape of `{}`.", input.name);
        quote! {
            #[doc = #doc]
            #name: #shape,
        }
    });
    let grad_type = |input: Option<&Input>| match input {
        Some(input) => {
            let shape = shape_type(layer, &input.axes);
            quote!(::attn::__private::Tensor<#in_elem, #shape>)
        }
        None => quote!(()),
    };
    let (q_ty, k_ty, v_ty) = (
        grad_type(Some(&layer.inputs_q)),
        grad_type(layer.inputs_k.as_ref()),
        grad_type(layer.inputs_v.as_ref()),
    );
    let grad_value = |name: &str, input: Option<&Input>| match input {
        Some(_) => {
            let field = format_ident!("{name}");
            quote! {
                ::attn::__private::typed(
                    #name,
                    grads.#field.ok_or_else(|| ::attn::__private::AttnError::InvalidArgument {
                        argument: #name,
                        reason: "the layer returned no gradient".into(),
                    })?,
                    self.#field,
                )?
            }
        }
        None => quote!(()),
    };
    let (k_value, v_value) = (
        grad_value("inputs_k", layer.inputs_k.as_ref()),
        grad_value("inputs_v", layer.inputs_v.as_ref()),
    );
    // Run-time dims of the cotangent: equal to the output's.
    let checks = out_axes.iter().enumerate().filter_map(|(i, axis)| {
        let Axis::Named(name) = axis else { return None };
        layer.static_size(name).is_none().then(|| {
            let dim = name.to_string();
            let index = syn::Index::from(i);
            quote! {
                ::attn::__private::same_dim(#dim, ("output", self.output.#index), ("d_output", d_output_shape.#index))?;
            }
        })
    });
    let grads_text: Vec<String> = float_inputs(layer)
        .into_iter()
        .map(|input| format!("`{}` `{}`", input.name, shape_text(layer, &input.axes)))
        .collect();
    let struct_docs = docs([format!(
        "The pullback of [`{ident}::vjp`]: what the backward of one call needs (the \
             inputs, borrowed, the projections, the attention output and its residuals)."
    )]);
    let backward_docs = docs([
        "The gradients of the call's inputs and of every parameter, given `d_output`, the \
         loss's gradient with respect to the output."
            .to_owned(),
        String::new(),
        format!(
            "- `d_output`: `{}` of `{}`",
            shape_text(layer, &out_axes),
            layer.output_dtype().rust_name()
        ),
        "- `ctx`: the forward's `deterministic` and dropout RNG".to_owned(),
        String::new(),
        format!(
            "Returns the gradients of {} (of `{}`; in self-attention `inputs_q`'s is the sum \
             of its query, key and value paths) and the parameters' as a parameter tree.",
            grads_text.join(", "),
            layer.input_dtype().rust_name()
        ),
        String::new(),
        "# Errors".to_owned(),
        String::new(),
        "`attn::AttnError::DimMismatch` if `d_output`'s run-time dims are not the output's; \
         `InvalidArgument` naming `residuals` if `ctx`'s dropout RNG is not the forward's."
            .to_owned(),
    ]);
    quote! {
        #struct_docs
        #allow
        #vis struct #pullback<'a, #(#names,)*> {
            /// The runtime layer's pullback.
            pullback: ::attn::__private::layer::MhaPullback<'a>,
            #(#fields)*
            /// The shape of the output.
            output: #out_shape_ty,
        }
        #allow
        impl<'a, #(#names: ::attn::__private::Dim,)*> #pullback<'a, #(#names,)*> {
            #backward_docs
            pub fn backward(
                &self,
                d_output: ::attn::__private::TensorView<'_, #out_elem, #out_shape_ty>,
                ctx: &mut ::attn::__private::Context<'_>,
            ) -> ::core::result::Result<
                ::attn::__private::layer::LayerGradients<#q_ty, #k_ty, #v_ty>,
                ::attn::__private::AttnError,
            > {
                let d_output_shape = d_output.shape();
                #(#checks)*
                let cotangent = ::attn::__private::array_of(d_output)?;
                let grads = self.pullback.backward(&cotangent, ctx)?;
                ::core::result::Result::Ok(::attn::__private::layer::LayerGradients {
                    inputs_q: ::attn::__private::typed("inputs_q", grads.inputs_q, self.inputs_q)?,
                    inputs_k: #k_value,
                    inputs_v: #v_value,
                    params: grads.params,
                })
            }
        }
    }
}
