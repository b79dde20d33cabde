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
pub mod layer;
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
    let (cores, projections) = split(parsed);
    let mut tokens = TokenStream::new();
    let core_names: Vec<&syn::Ident> = cores.layers.iter().map(|l| &l.ident).collect();
    let (expanded, projection_error) = validate::projection::validate_projections(
        &projections.layers.iter().collect::<Vec<_>>(),
        &core_names,
    );
    if !cores.layers.is_empty() {
        tokens.extend(match validate_recovering(&cores) {
            (layers, None) => expand(&layers),
            // Layers whose shapes are right are still expanded, the others are stubbed.
            (layers, Some(error)) => {
                let mut tokens = fallback::expand(&cores, &layers, error);
                tokens.extend(expand(&layers));
                tokens
            }
        });
    }
    if let Some(error) = projection_error {
        tokens.extend(fallback::expand_projections(&projections, &expanded, error));
    }
    tokens.extend(layer::expand(&expanded));
    tokens
}

/// Like [`attention`], but returns the errors instead of embedding them (for tools and tests).
pub fn try_attention(input: TokenStream) -> syn::Result<TokenStream> {
    let parsed = parse(input)?;
    let (cores, projections) = split(parsed);
    let core_names: Vec<&syn::Ident> = cores.layers.iter().map(|l| &l.ident).collect();
    let (expanded, projection_error) = validate::projection::validate_projections(
        &projections.layers.iter().collect::<Vec<_>>(),
        &core_names,
    );
    let core = if cores.layers.is_empty() {
        Ok(Vec::new())
    } else {
        validate(&cores)
    };
    let mut tokens = match (core, projection_error) {
        (Ok(layers), None) => expand(&layers),
        (Err(mut error), Some(other)) => {
            error.combine(other);
            return Err(error);
        }
        (Err(error), None) | (Ok(_), Some(error)) => return Err(error),
    };
    tokens.extend(layer::expand(&expanded));
    Ok(tokens)
}

/// The attention cores and the projection layers ([`layer::is_projection`]) of an invocation.
fn split(input: parse::Input) -> (parse::Input, parse::Input) {
    let (projections, cores) = input.layers.into_iter().partition(layer::is_projection);
    (
        parse::Input { layers: cores },
        parse::Input {
            layers: projections,
        },
    )
}
