//! Parser, validator and code generator of the `attention!` macro, as plain functions on
//! [`proc_macro2::TokenStream`] (used by the proc-macro crate, the expansion viewer, the
//! snapshot tests and the fuzz test).
//!
//! The pipeline is [`parse()`] → [`validate()`] → [`expand()`]; [`attention`] runs all three and
//! never fails: on error it returns `compile_error!`s plus a stub of each layer.

#![deny(missing_docs)]

mod fallback;
mod invocations;
pub mod ir;
pub mod parse;
mod suggest;
pub mod validate;

mod expand;

pub use expand::{dims_module_name, expand};
pub use invocations::invocations;
pub use parse::parse;
pub use validate::{validate, validate_recovering};

use proc_macro2::TokenStream;

/// The whole macro: the expansion of `input`, or its errors (all of them) and stub layers.
pub fn attention(input: TokenStream) -> TokenStream {
    let parsed = match parse(input) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_compile_error(),
    };
    match validate_recovering(&parsed) {
        (layers, None) => expand(&layers),
        // Layers whose shapes are right are still expanded, the others are stubbed.
        (layers, Some(error)) => {
            let mut tokens = fallback::expand(&parsed, &layers, error);
            tokens.extend(expand(&layers));
            tokens
        }
    }
}

/// Like [`attention`], but returns the errors instead of embedding them (for tools and tests).
pub fn try_attention(input: TokenStream) -> syn::Result<TokenStream> {
    let parsed = parse(input)?;
    let layers = validate(&parsed)?;
    Ok(expand(&layers))
}
