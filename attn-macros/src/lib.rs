//! The `attention!` procedural macro. All logic lives in `attn-codegen`; see the `attn` crate's
//! documentation for the grammar.

/// Declares attention layers; see the `attn` crate's documentation.
#[proc_macro]
pub fn attention(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    attn_codegen::attention(input.into()).into()
}
