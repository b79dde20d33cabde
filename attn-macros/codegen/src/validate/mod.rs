//! Stage 2: checks a parsed declaration and builds the [`ir::Layer`] that expansion needs.
//!
//! Every check records its error and keeps going, so one build reports every mistake of a
//! declaration (all errors are joined with [`syn::Error::combine`]). Each error points at the
//! token that causes it.

use std::collections::BTreeMap;

use proc_macro2::{Ident, Span, TokenStream};
use quote::ToTokens;
use syn::{Lit, LitInt};

use crate::ir::{self, Axis, DType, Layer, NamedDim, Operand, Options, Precision};
use crate::parse::{DimSyntax, Entry, Input, LayerSyntax, ShapeSyntax, Term};
use crate::suggest;

mod dims;
mod dtype;
mod heads;
mod layout;
mod mask;
mod options;
pub mod projection;
mod structure;
#[cfg(test)]
mod tests;

use dims::*;
use dtype::*;
use layout::*;
use mask::*;
use options::*;
use structure::*;

/// The keys a declaration's entries may have, in the order of the grammar in docs/macro.md.
pub const KEYS: &[&str] = &[
    "query",
    "key",
    "value",
    "bias",
    "mask",
    "dropout_rate",
    "broadcast_dropout",
    "dtype",
    "precision",
    "force_fp32_for_softmax",
    "sow",
    "scale",
];

const PRECISIONS: &[&str] = &["default", "high", "highest"];

/// The most dims a tensor may have (the runtime's shapes are tuples of rank 0 to 8).
const MAX_RANK: usize = 8;

/// Collects errors; the serde_derive `Ctxt` pattern. Each entry is a group: an error plus any
/// notes that belong with it (such as "first set here"). Groups are reported in source order.
#[derive(Default)]
struct Errors(Vec<Vec<syn::Error>>);

impl Errors {
    fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.0.push(vec![syn::Error::new(span, message)]);
    }

    fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.0.push(vec![syn::Error::new_spanned(tokens, message)]);
    }

    /// An error at `span` and a note at `related` reported right after it.
    fn with_note(
        &mut self,
        span: Span,
        message: impl std::fmt::Display,
        related: Span,
        note: impl std::fmt::Display,
    ) {
        self.0.push(vec![
            syn::Error::new(span, message),
            syn::Error::new(related, note),
        ]);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn into_result<T>(mut self, value: T) -> syn::Result<T> {
        // Source order (a stable sort keeps the checks' order for errors at one token).
        self.0.sort_by_key(|group| {
            let start = group[0].span().start();
            (start.line, start.column)
        });
        let mut errors = self.0.into_iter().flatten();
        match errors.next() {
            None => Ok(value),
            Some(mut first) => {
                first.extend(errors);
                Err(first)
            }
        }
    }
}

/// Validates every layer of an invocation; the error holds every mistake of every layer.
pub fn validate(input: &Input) -> syn::Result<Vec<Layer>> {
    match validate_recovering(input) {
        (layers, None) => Ok(layers),
        (_, Some(error)) => Err(error),
    }
}

/// Like [`validate`], but also returns the layers whose shapes are correct when other entries
/// are wrong (an unknown or invalid option): such a layer gets the options that were valid and
/// Flax's defaults for the others. Expanding them next to the errors defines every layer with its
/// real signature, so code that uses a layer gets no follow-up errors.
pub fn validate_recovering(input: &Input) -> (Vec<Layer>, Option<syn::Error>) {
    let mut errors = Errors::default();
    let mut layers = Vec::new();
    let mut names: BTreeMap<String, &Ident> = BTreeMap::new();
    for syntax in &input.layers {
        let duplicate = names.get(&syntax.ident.to_string()).copied();
        if let Some(first) = duplicate {
            errors.with_note(
                syntax.ident.span(),
                format!("a layer named `{}` is already declared above", syntax.ident),
                first.span(),
                format!("`{first}` first declared here"),
            );
        } else {
            names.insert(syntax.ident.to_string(), &syntax.ident);
        }
        let layer = validate_layer(syntax, &mut errors);
        if let (Some(layer), None) = (layer, duplicate) {
            layers.push(layer);
        }
    }
    match errors.into_result(()) {
        Ok(()) => (layers, None),
        Err(error) => (layers, Some(error)),
    }
}

fn line_of(span: Span) -> usize {
    span.start().line
}

fn written(tokens: &TokenStream) -> String {
    let text = tokens.to_string();
    // `TokenStream`'s printing puts spaces inside brackets and before commas; tidy it.
    let text = text
        .replace("[ ", "[")
        .replace(" ]", "]")
        .replace(" ,", ",")
        .replace("- ", "-")
        .replace("( ", "(")
        .replace(" )", ")");
    // `window (3, 0)` -> `window(3, 0)`: no space between a name and its arguments.
    let mut tidy = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let call = c == ' '
            && chars.peek() == Some(&'(')
            && tidy.ends_with(|p: char| p.is_alphanumeric() || p == '_');
        if !call {
            tidy.push(c);
        }
    }
    tidy
}

/// The entries of one layer by name, after reporting duplicates and unknown names.
fn index_entries<'a>(
    layer: &'a LayerSyntax,
    errors: &mut Errors,
) -> BTreeMap<&'static str, &'a Entry> {
    let mut seen: BTreeMap<&'static str, &Entry> = BTreeMap::new();
    for entry in &layer.entries {
        let key = entry.key.to_string();
        let Some(&known) = KEYS.iter().find(|k| **k == key) else {
            errors.at(entry.key.span(), unknown_key_message(&key));
            continue;
        };
        for attr in &entry.attrs {
            if !attr.path().is_ident("doc") {
                errors.spanned(attr, "only doc comments are allowed on an entry");
            }
        }
        if let Some(first) = seen.get(known) {
            errors.with_note(
                entry.key.span(),
                format!("duplicate `{known}`: it is already set above"),
                first.key.span(),
                format!("`{known}` first set here"),
            );
        } else {
            seen.insert(known, entry);
        }
    }
    seen
}

/// Whether an unknown entry of `layer` is a misspelling of `name` (it got `name` as suggestion).
fn misspelt(layer: &LayerSyntax, name: &str) -> bool {
    layer.entries.iter().any(|entry| {
        let key = entry.key.to_string();
        !KEYS.contains(&key.as_str()) && suggestion(&key).as_deref() == Some(name)
    })
}

/// The valid name an unknown entry name most likely means.
fn suggestion(key: &str) -> Option<String> {
    match key {
        "q" | "queries" => Some("query".to_owned()),
        "k" | "keys" => Some("key".to_owned()),
        "v" | "values" => Some("value".to_owned()),
        _ => suggest::nearest(key, KEYS).map(str::to_owned),
    }
}

fn unknown_key_message(key: &str) -> String {
    let hint = match key {
        "causal" | "is_causal" => Some("write `mask: causal` for a causal mask".to_owned()),
        "heads" | "num_heads" | "depth" | "head_dim" | "batch" | "q_len" | "kv_len" | "length" => {
            Some(
                "sizes are written in the shapes: `query: [batch.., len, heads, depth]`, \
                 e.g. `query: [B, T, H = 12, D = 64]`"
                    .to_owned(),
            )
        }
        "deterministic" | "dropout_rng" | "rng" | "seed" => Some(format!(
            "`{key}` is chosen per call: set it on the `Context` argument"
        )),
        "module" => Some("Flax's `module` is written `sow: attention_weights`".to_owned()),
        _ => suggestion(key).map(|name| format!("did you mean `{name}`?")),
    };
    let mut message = format!("unknown option `{key}`");
    if let Some(hint) = hint {
        message.push_str("; ");
        message.push_str(&hint);
    }
    message.push_str(&format!("\n  expected one of: {}", list(KEYS)));
    message
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The layer, if its shapes are correct (other mistakes are recorded in `errors` and do not
/// prevent it; see [`validate_recovering`]).
fn validate_layer(syntax: &LayerSyntax, errors: &mut Errors) -> Option<Layer> {
    errors
        .0
        .extend(syntax.errors.iter().map(|e| vec![e.clone()]));
    for attr in &syntax.attrs {
        if !attr.path().is_ident("doc") {
            errors.spanned(
                attr,
                "only doc comments are allowed on an `attention!` layer; \
                 the struct's derives and attributes are generated",
            );
        }
    }
    let entries = index_entries(syntax, errors);
    let options = read_options(&entries, errors);
    // Errors from here on are about the shapes: with one of them, the layer is not built.
    let before_shapes = errors.len();
    let mut table = DimTable::default();

    // Shapes, in declaration order of the roles, so that dims are numbered predictably.
    let shape_of = |name: &str, errors: &mut Errors, table: &mut DimTable| {
        let entry = *entries.get(name)?;
        let shape = single_shape(entry, errors)?;
        let dims = read_dims(shape, table, errors);
        Some(ShapeEntry { entry, shape, dims })
    };
    let query = shape_of("query", errors, &mut table);
    let key = shape_of("key", errors, &mut table);
    let value = shape_of("value", errors, &mut table);
    let bias = shape_of("bias", errors, &mut table);
    let mask = entries
        .get("mask")
        .and_then(|entry| read_mask(entry, &mut table, errors));

    // After a syntax error inside the braces, or a misspelt `query`/`key` (reported with a
    // suggestion), the entry is there, just unreadable: no second error for it.
    let missing: Vec<&str> = ["query", "key"]
        .into_iter()
        .filter(|name| !entries.contains_key(name) && !misspelt(syntax, name))
        .collect();
    if !missing.is_empty() && syntax.errors.is_empty() {
        let missing = missing
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(" and no ");
        errors.at(
            syntax.ident.span(),
            format!(
                "`{}` has no {missing}: every layer declares `query: [..]` and `key: [..]`",
                syntax.ident
            ),
        );
    }

    let check = Structure { table: &table };
    let query_ok = query
        .as_ref()
        .is_some_and(|q| check.rank("query", q, errors));
    let key_ok = key.as_ref().is_some_and(|k| check.rank("key", k, errors));
    let value_ok = value
        .as_ref()
        .is_some_and(|v| check.rank("value", v, errors));
    // Another framework's layout is reported once per tensor, instead of the mismatches of heads
    // and lengths that it causes.
    let (query_ok, key_ok, value_ok) = {
        let checked: Vec<Option<&ShapeEntry>> =
            [(&query, query_ok), (&key, key_ok), (&value, value_ok)]
                .into_iter()
                .map(|(shape, ok)| shape.as_ref().filter(|_| ok))
                .collect();
        let mut broadcast: Vec<&ShapeEntry> = bias.iter().collect();
        if let Some(MaskTerms {
            explicit: Some(explicit),
            ..
        }) = &mask
        {
            broadcast.push(explicit);
        }
        let foreign = check_layouts(&checked, &broadcast, errors);
        (
            query_ok && !foreign[0],
            key_ok && !foreign[1],
            value_ok && !foreign[2],
        )
    };
    if let (Some(query), Some(key), true, true) = (&query, &key, query_ok, key_ok) {
        // With another number of batch dims, the other dims may be shifted: one error is enough.
        let key_batch_ok = check.same_batch("key", key, query, errors);
        if key_batch_ok {
            check.kv_heads(key, query, errors);
            check.same_axis(key, 0, "depth", query, 0, "depth", errors);
        }
        if let (Some(value), true) = (&value, value_ok) {
            // Compared with `query` and `key` where possible, so a mistake in `key` is
            // reported once.
            if check.same_batch("value", value, query, errors) {
                if key_batch_ok {
                    check.same_axis(value, 1, "heads", key, 1, "heads", errors);
                    check.same_axis(value, 2, "length", key, 2, "length", errors);
                } else {
                    check.same_axis(value, 1, "heads", query, 1, "heads", errors);
                }
            }
        }
        let targets = Targets::new(query, key);
        if let Some(bias) = &bias {
            check.broadcast("bias", bias, &targets, errors);
        }
        if let Some(MaskTerms {
            explicit: Some(explicit),
            ..
        }) = &mask
        {
            check.broadcast("mask", explicit, &targets, errors);
        }
    }
    if errors.len() > before_shapes || !syntax.errors.is_empty() {
        return None;
    }
    let operand = |name: &'static str, shape: ShapeEntry| Operand {
        name,
        axes: shape.dims.into_iter().filter_map(|d| d.axis).collect(),
        written: written(&shape.entry.value.tokens),
        line: line_of(shape.entry.key.span()),
        docs: doc_lines(&shape.entry.attrs),
        span: shape.entry.key.span(),
    };
    let mask_line = entries
        .get("mask")
        .map_or(0, |entry| line_of(entry.key.span()));
    let mask_written = entries
        .get("mask")
        .map_or(String::new(), |entry| written(&entry.value.tokens));
    let terms = mask.unwrap_or_default();
    let query = query?;
    let key = key?;
    let batch = query.dims.len() - 3;
    let axes_of = |shape: &ShapeEntry, range: &[usize]| -> Vec<Axis> {
        range
            .iter()
            .filter_map(|&i| shape.dims[i].axis.clone())
            .collect()
    };
    let batch_axes: Vec<usize> = (0..batch).collect();
    let with = |mut axes: Vec<usize>, last: usize| {
        axes.push(last);
        axes
    };
    let index_operand = |name: &'static str, axes: Vec<Axis>, span: Span| Operand {
        name,
        written: shape_text(&axes),
        axes,
        line: line_of(span),
        docs: Vec::new(),
        span,
    };
    let query_lengths = terms
        .query_lengths
        .map(|span| index_operand("query_lengths", axes_of(&query, &batch_axes), span));
    let kv_lengths = terms
        .kv_lengths
        .map(|span| index_operand("kv_lengths", axes_of(&query, &batch_axes), span));
    let segment_ids = terms.segment_ids.map(|span| {
        let mut key_axes = axes_of(&query, &batch_axes);
        key_axes.extend(axes_of(&key, &[key.dims.len() - 3]));
        (
            index_operand(
                "query_segment_ids",
                axes_of(&query, &with(batch_axes.clone(), batch)),
                span,
            ),
            index_operand("kv_segment_ids", key_axes, span),
        )
    });
    Some(Layer {
        docs: syntax.attrs.clone(),
        vis: syntax.vis.clone(),
        ident: syntax.ident.clone(),
        line: line_of(syntax.struct_token.span),
        dims: table.dims,
        query: operand("query", query),
        key: operand("key", key),
        value: value.map(|v| operand("value", v)),
        bias: bias.map(|b| operand("bias", b)),
        mask: ir::Mask {
            causal: terms.causal.map(|(align, _)| align),
            window: terms.window,
            query_lengths,
            kv_lengths,
            segment_ids,
            explicit: terms.explicit.map(|m| operand("mask", m)),
            line: mask_line,
            written: mask_written,
        },
        options,
    })
}

fn shape_text(axes: &[Axis]) -> String {
    let names: Vec<String> = axes
        .iter()
        .map(|axis| match axis {
            Axis::Named(name) => name.to_string(),
            Axis::Size(n) => n.to_string(),
        })
        .collect();
    format!("[{}]", names.join(", "))
}

fn doc_lines(attrs: &[syn::Attribute]) -> Vec<String> {
    attrs
        .iter()
        .filter_map(|attr| match &attr.meta {
            syn::Meta::NameValue(nv) if nv.path.is_ident("doc") => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value().trim().to_owned()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
