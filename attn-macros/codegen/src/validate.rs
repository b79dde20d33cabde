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

const DTYPES: &[&str] = &["f32", "f64", "bf16", "f16"];
const PRECISIONS: &[&str] = &["default", "high", "highest"];

/// Whether the runtime has issue 13's kernel API (`Mask` as a struct with alignment, window,
/// lengths and segment ids; `Geometry::kv_heads`). Until it does, declarations that need it are
/// validated in full and then rejected with a "not yet supported" error at the term.
pub const STRUCTURES: bool = false;

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
    text.replace("[ ", "[")
        .replace(" ]", "]")
        .replace(" ,", ",")
        .replace("- ", "-")
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

/// A dim of a shape after the first checks; `None` where the dim itself was wrong.
struct DimUse {
    axis: Option<Axis>,
    span: Span,
}

/// The layer's named dims, built while reading shapes in declaration order.
#[derive(Default)]
struct DimTable {
    dims: Vec<NamedDim>,
    /// For each name with a size: the span of the size that bound it.
    bound_at: BTreeMap<String, (usize, Span)>,
}

impl DimTable {
    fn use_name(&mut self, name: &Ident) {
        if !self.dims.iter().any(|d| d.name == *name) {
            self.dims.push(NamedDim {
                name: name.clone(),
                size: None,
                line: line_of(name.span()),
                span: name.span(),
            });
        }
    }

    fn bind(&mut self, name: &Ident, size: usize, span: Span, errors: &mut Errors) {
        self.use_name(name);
        let key = name.to_string();
        if let Some(&(first, first_span)) = self.bound_at.get(&key) {
            if first != size {
                errors.with_note(
                    span,
                    format!(
                        "`{name}` is bound to two sizes: {size} here and {first} above; \
                         a name means the same size everywhere in a declaration"
                    ),
                    first_span,
                    format!("`{name}` first bound to {first} here"),
                );
            }
            return;
        }
        self.bound_at.insert(key, (size, span));
        if let Some(dim) = self.dims.iter_mut().find(|d| d.name == *name) {
            dim.size = Some(size);
            dim.line = line_of(span);
            dim.span = name.span();
        }
    }

    fn size_of(&self, name: &Ident) -> Option<usize> {
        self.dims
            .iter()
            .find(|d| d.name == *name)
            .and_then(|d| d.size)
    }
}

/// Names a dim may not have: they would shadow a type that the generated code uses.
const RESERVED_DIM_NAMES: &[&str] = &[
    "bool", "char", "str", "f16", "f32", "f64", "bf16", "i8", "i16", "i32", "i64", "i128", "isize",
    "u8", "u16", "u32", "u64", "u128", "usize", "Self", "self", "_",
];

fn check_dim_name(name: &Ident, errors: &mut Errors) -> bool {
    let text = name.to_string();
    if RESERVED_DIM_NAMES.contains(&text.as_str()) {
        errors.at(
            name.span(),
            format!("`{text}` cannot name a dim: it is a type or keyword; choose another name"),
        );
        false
    } else if syn::parse2::<Ident>(name.to_token_stream()).is_err() {
        errors.at(
            name.span(),
            format!("`{text}` is a keyword and cannot name a dim; choose another name"),
        );
        false
    } else {
        true
    }
}

fn parse_size(lit: &LitInt, errors: &mut Errors) -> Option<usize> {
    if !matches!(lit.suffix(), "" | "usize") {
        errors.at(
            lit.span(),
            format!(
                "a dim size is a plain integer, such as `{}`",
                lit.base10_digits()
            ),
        );
        return None;
    }
    match lit.base10_parse::<usize>() {
        Ok(size) => Some(size),
        Err(_) => {
            errors.at(lit.span(), "this dim size does not fit in `usize`");
            None
        }
    }
}

fn zero_size_message(name: Option<&Ident>) -> String {
    let run_time = match name {
        Some(name) => format!("write `{name}` without a size"),
        None => "write a name such as `T`".to_owned(),
    };
    format!(
        "a static size of 0 would make every tensor with this dim empty; a static size is at \
         least 1 ({run_time} to choose the size at run time, where 0 is allowed)"
    )
}

const DIM_FORMS: &str =
    "expected a name (`T`), a name with a static size (`H = 12`) or a size (`64`)";

fn read_dims(shape: &ShapeSyntax, table: &mut DimTable, errors: &mut Errors) -> Vec<DimUse> {
    let mut uses = Vec::new();
    for dim in &shape.dims {
        let (axis, span) = match dim {
            DimSyntax::Named(name) => {
                let ok = check_dim_name(name, errors);
                if ok {
                    table.use_name(name);
                }
                (ok.then(|| Axis::Named(name.clone())), name.span())
            }
            DimSyntax::Bound { name, size } => {
                let ok = check_dim_name(name, errors);
                let value = match size {
                    Term::Lit {
                        minus: None,
                        lit: Lit::Int(lit),
                    } => parse_size(lit, errors).map(|n| (n, lit.span())),
                    Term::Lit { minus: Some(_), .. } => {
                        errors.spanned(size.to_token_stream(), "a dim size cannot be negative");
                        None
                    }
                    other => {
                        let tokens = other.to_token_stream();
                        let found = written(&tokens);
                        errors.spanned(
                            tokens,
                            format!(
                                "the size of `{name}` must be an integer literal, \
                                 such as `{name} = 64`; found `{found}`"
                            ),
                        );
                        None
                    }
                };
                if let Some((0, span)) = value {
                    errors.at(span, zero_size_message(Some(name)));
                }
                if ok {
                    match value {
                        Some((n, span)) if n > 0 => table.bind(name, n, span, errors),
                        _ => table.use_name(name),
                    }
                }
                (ok.then(|| Axis::Named(name.clone())), name.span())
            }
            DimSyntax::Size(lit) => match parse_size(lit, errors) {
                Some(0) => {
                    errors.at(lit.span(), zero_size_message(None));
                    (None, lit.span())
                }
                size => (size.map(Axis::Size), lit.span()),
            },
            DimSyntax::Malformed(tokens, span) => {
                let semicolon = tokens
                    .clone()
                    .into_iter()
                    .any(|t| matches!(t, proc_macro2::TokenTree::Punct(p) if p.as_char() == ';'));
                let words = tokens.clone().into_iter().count() > 1
                    && tokens.clone().into_iter().all(|t| {
                        matches!(
                            t,
                            proc_macro2::TokenTree::Ident(_) | proc_macro2::TokenTree::Literal(_)
                        )
                    });
                if tokens.is_empty() {
                    errors.at(*span, format!("missing dim before this `,`: {DIM_FORMS}"));
                } else if words {
                    errors.spanned(
                        tokens,
                        format!(
                            "expected `,` between dims: `[{}]`",
                            written(tokens).split(' ').collect::<Vec<_>>().join(", ")
                        ),
                    );
                } else if semicolon {
                    errors.spanned(tokens, "dims are separated by `,`, not `;`");
                } else {
                    errors.spanned(
                        tokens,
                        format!("malformed dim `{}`: {DIM_FORMS}", written(tokens)),
                    );
                }
                (None, *span)
            }
        };
        uses.push(DimUse { axis, span });
    }
    uses
}

/// A shape entry whose dims were read; rank checks apply to `dims.len()`.
struct ShapeEntry<'a> {
    entry: &'a Entry,
    shape: &'a ShapeSyntax,
    dims: Vec<DimUse>,
}

fn single_shape<'a>(entry: &'a Entry, errors: &mut Errors) -> Option<&'a ShapeSyntax> {
    match entry.value.terms.as_slice() {
        [Term::Shape(shape)] => Some(shape),
        _ => {
            let example = match entry.key.to_string().as_str() {
                "query" => "[B, T, H, D]",
                "key" | "value" => "[B, S, H, D]",
                _ => "[B, 1, T, S]",
            };
            errors.spanned(
                &entry.value.tokens,
                format!(
                    "`{}` expects a shape in brackets, such as `{example}`",
                    entry.key
                ),
            );
            None
        }
    }
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
    let mut needs_runtime: Vec<(Span, String)> = Vec::new();
    if let (Some(query), Some(key), true, true) = (&query, &key, query_ok, key_ok) {
        // With another number of batch dims, the other dims may be shifted: one error is enough.
        let key_batch_ok = check.same_batch("key", key, query, errors);
        if key_batch_ok {
            if let Some(span) = check.kv_heads(key, query, errors) {
                needs_runtime.push((
                    span,
                    "key/value heads other than the query heads (grouped-query attention)"
                        .to_owned(),
                ));
            }
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
    if let Some(terms) = &mask {
        needs_runtime.extend(terms.structured.iter().cloned());
    }
    if !STRUCTURES {
        for (span, what) in needs_runtime {
            errors.at(
                span,
                format!(
                    "{what}: not yet supported; the declaration is valid, but this build's \
                     runtime does not have the kernel API it needs (issue 13: `Mask` with \
                     alignment, windows, lengths and segment ids, `Geometry::kv_heads`)"
                ),
            );
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

/// The terms of a `mask` entry, as read.
#[derive(Default)]
struct MaskTerms<'a> {
    causal: Option<(ir::Align, Span)>,
    window: Option<ir::Window>,
    query_lengths: Option<Span>,
    kv_lengths: Option<Span>,
    segment_ids: Option<Span>,
    explicit: Option<ShapeEntry<'a>>,
    /// Each term that needs the structured-mask runtime, with what it is.
    structured: Vec<(Span, String)>,
}

const MASK_FORMS: &str = "a mask is `+`-joined terms: `causal`, `causal(bottom_right)`, \
     `causal(offset = N)`, `window(left, right)`, `query_lengths`, `kv_lengths`, `segment_ids` \
     or a shape such as `[B, 1, 1, S]`";

/// The names of a mask's terms, for "did you mean".
const MASK_TERMS: &[&str] = &[
    "causal",
    "window",
    "query_lengths",
    "kv_lengths",
    "segment_ids",
];

/// `top_left`, `bottom_right`, `offset = N` (inside `causal(..)` or as `window`'s third argument).
fn read_align(tokens: &TokenStream, span: Span, errors: &mut Errors) -> Option<ir::Align> {
    use proc_macro2::TokenTree;
    let trees: Vec<TokenTree> = tokens.clone().into_iter().collect();
    let forms = "an alignment is `top_left` (Flax's `make_causal_mask`), `bottom_right` \
                 (KV-cache decoding) or `offset = N`";
    match trees.as_slice() {
        [TokenTree::Ident(ident)] => match ident.to_string().as_str() {
            "top_left" => Some(ir::Align::TopLeft),
            "bottom_right" => Some(ir::Align::BottomRight),
            text => {
                let hint = match text {
                    "upper_left" | "TopLeft" | "top_left_aligned" => Some("top_left"),
                    "lower_right" | "BottomRight" | "bottom_right_aligned" => Some("bottom_right"),
                    _ => suggest::nearest(text, &["top_left", "bottom_right", "offset"]),
                }
                .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                errors.at(
                    ident.span(),
                    format!("unknown alignment `{text}`; {hint}{forms}"),
                );
                None
            }
        },
        [TokenTree::Ident(ident), TokenTree::Punct(eq), rest @ ..]
            if ident == "offset" && eq.as_char() == '=' =>
        {
            let (negative, literal) = match rest {
                [TokenTree::Literal(literal)] => (false, literal),
                [TokenTree::Punct(minus), TokenTree::Literal(literal)]
                    if minus.as_char() == '-' =>
                {
                    (true, literal)
                }
                _ => {
                    errors.spanned(tokens, "`offset` takes an integer, such as `offset = 16`");
                    return None;
                }
            };
            match Lit::new(literal.clone()) {
                Lit::Int(int) if matches!(int.suffix(), "" | "i64") => {
                    match int.base10_parse::<i64>() {
                        Ok(n) => Some(ir::Align::Offset(if negative { -n } else { n })),
                        Err(_) => {
                            errors.at(literal.span(), "this offset does not fit in `i64`");
                            None
                        }
                    }
                }
                _ => {
                    errors.at(
                        literal.span(),
                        "`offset` takes an integer, such as `offset = 16`",
                    );
                    None
                }
            }
        }
        [TokenTree::Literal(literal)] => {
            errors.at(
                literal.span(),
                format!("write the offset as `offset = {literal}`; {forms}"),
            );
            None
        }
        [] => {
            errors.at(span, format!("missing alignment: {forms}"));
            None
        }
        _ => {
            errors.spanned(tokens, forms);
            None
        }
    }
}

/// A window side: a non-negative integer.
fn read_side(tokens: &TokenStream, which: &str, span: Span, errors: &mut Errors) -> Option<usize> {
    use proc_macro2::TokenTree;
    let trees: Vec<TokenTree> = tokens.clone().into_iter().collect();
    match trees.as_slice() {
        [TokenTree::Literal(literal)] => match Lit::new(literal.clone()) {
            Lit::Int(int) if matches!(int.suffix(), "" | "usize") => {
                match int.base10_parse::<usize>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        errors.at(literal.span(), "this window size does not fit in `usize`");
                        None
                    }
                }
            }
            _ => {
                errors.at(
                    literal.span(),
                    format!("the {which} side of a window is a number of keys, such as `512`"),
                );
                None
            }
        },
        [TokenTree::Punct(minus), TokenTree::Literal(_)] if minus.as_char() == '-' => {
            errors.spanned(
                tokens,
                format!(
                    "the {which} side of a window cannot be negative; `0` sees no key on that \
                     side but the query's own position"
                ),
            );
            None
        }
        [] => {
            errors.at(
                span,
                format!("missing the {which} side of the window: a number of keys, such as `512`"),
            );
            None
        }
        _ => {
            errors.spanned(
                tokens,
                format!(
                    "the {which} side of a window is a number of keys, such as `512`; found `{}`",
                    written(tokens)
                ),
            );
            None
        }
    }
}

/// `mask: term + term + ..`; `None` if a term is wrong (reported).
fn read_mask<'a>(
    entry: &'a Entry,
    table: &mut DimTable,
    errors: &mut Errors,
) -> Option<MaskTerms<'a>> {
    let mut terms = MaskTerms::default();
    let mut window: Option<(usize, usize, Option<ir::Align>, Span)> = None;
    let mut seen: BTreeMap<&'static str, Span> = BTreeMap::new();
    let mut ok = true;
    let mut once = |name: &'static str, span: Span, errors: &mut Errors| {
        if let Some(first) = seen.get(name) {
            errors.with_note(
                span,
                format!("`{name}` appears twice in this mask"),
                *first,
                format!("`{name}` first written here"),
            );
            false
        } else {
            seen.insert(name, span);
            true
        }
    };
    for term in &entry.value.terms {
        match term {
            Term::Ident(ident) if ident == "causal" => {
                if once("causal", ident.span(), errors) {
                    terms.causal = Some((ir::Align::TopLeft, ident.span()));
                } else {
                    ok = false;
                }
            }
            Term::Call { name, span, args } if name == "causal" => {
                let tokens = term.to_token_stream();
                let align = match args.as_slice() {
                    [arg] => read_align(arg, *span, errors),
                    _ => {
                        errors.at(
                            *span,
                            "`causal(..)` takes one alignment: `causal(top_left)`, \
                             `causal(bottom_right)` or `causal(offset = N)`",
                        );
                        None
                    }
                };
                match align {
                    Some(align) if once("causal", name.span(), errors) => {
                        terms.causal = Some((align, name.span()));
                        if align != ir::Align::TopLeft {
                            terms
                                .structured
                                .push((name.span(), format!("`{}`", written(&tokens))));
                        }
                    }
                    _ => ok = false,
                }
            }
            Term::Call { name, span, args } if name == "window" => {
                let tokens = term.to_token_stream();
                let read = match args.as_slice() {
                    [left, right] | [left, right, _] => {
                        let left = read_side(left, "left", *span, errors);
                        let right = read_side(right, "right", *span, errors);
                        let align = match args.get(2) {
                            Some(align) => read_align(align, *span, errors).map(Some),
                            None => Some(None),
                        };
                        match (left, right, align) {
                            (Some(left), Some(right), Some(align)) => Some((left, right, align)),
                            _ => None,
                        }
                    }
                    [one] => {
                        let n = written(one);
                        errors.at(
                            *span,
                            format!(
                                "`window` takes both sides: `window({n}, 0)` sees {n} keys \
                                 back (as Mistral's sliding window, with `causal`), \
                                 `window({n}, {n})` {n} keys each way (as jax.nn's \
                                 `local_window_size={n}`)"
                            ),
                        );
                        None
                    }
                    _ => {
                        errors.at(
                            *span,
                            "`window` takes the keys visible on each side: \
                             `window(left, right)`, and optionally an alignment \
                             `window(left, right, bottom_right)`",
                        );
                        None
                    }
                };
                match read {
                    Some((left, right, align)) if once("window", name.span(), errors) => {
                        window = Some((left, right, align, name.span()));
                        terms
                            .structured
                            .push((name.span(), format!("`{}`", written(&tokens))));
                    }
                    _ => ok = false,
                }
            }
            Term::Ident(ident) if ident == "window" => {
                errors.at(
                    ident.span(),
                    "`window` takes the keys visible on each side: `window(left, right)`, \
                     such as `window(4096, 0)`",
                );
                ok = false;
            }
            Term::Ident(ident)
                if ident == "query_lengths" || ident == "kv_lengths" || ident == "segment_ids" =>
            {
                let name: &'static str = match ident.to_string().as_str() {
                    "query_lengths" => "query_lengths",
                    "kv_lengths" => "kv_lengths",
                    _ => "segment_ids",
                };
                if once(name, ident.span(), errors) {
                    let slot = match name {
                        "query_lengths" => &mut terms.query_lengths,
                        "kv_lengths" => &mut terms.kv_lengths,
                        _ => &mut terms.segment_ids,
                    };
                    *slot = Some(ident.span());
                    terms.structured.push((ident.span(), format!("`{name}`")));
                } else {
                    ok = false;
                }
            }
            Term::Shape(shape) => {
                let dims = read_dims(shape, table, errors);
                if terms.explicit.is_some() {
                    errors.at(
                        shape.span,
                        "a layer takes one mask tensor; combine masks before the call, \
                         or join `causal` and one tensor: `mask: causal + [B, 1, 1, S]`",
                    );
                    ok = false;
                } else {
                    terms.explicit = Some(ShapeEntry { entry, shape, dims });
                }
            }
            Term::Ident(ident) | Term::Call { name: ident, .. } => {
                let text = ident.to_string();
                let hint = match text.as_str() {
                    "lengths" | "seq_lengths" => Some(
                        "write `kv_lengths` (keys past each sequence's length are invisible), \
                         `query_lengths` (query rows past it see no key), or both"
                            .to_owned(),
                    ),
                    "query_seq_lengths" | "q_lengths" => {
                        Some("did you mean `query_lengths`?".to_owned())
                    }
                    "key_value_seq_lengths"
                    | "kv_seq_lengths"
                    | "key_lengths"
                    | "key_value_lengths" => Some("did you mean `kv_lengths`?".to_owned()),
                    "segments" | "segment_id" | "segment" | "segment_ids_q" => {
                        Some("did you mean `segment_ids`?".to_owned())
                    }
                    "is_causal" | "make_causal_mask" => Some("did you mean `causal`?".to_owned()),
                    "causal_lower_right" | "causal_bottom_right" => {
                        Some("write `causal(bottom_right)`".to_owned())
                    }
                    "causal_upper_left" | "causal_top_left" => {
                        Some("write `causal` (top-left is the default)".to_owned())
                    }
                    "local_window_size" | "sliding_window" | "local" => {
                        Some("write `window(left, right)`".to_owned())
                    }
                    _ => {
                        suggest::nearest(&text, MASK_TERMS).map(|s| format!("did you mean `{s}`?"))
                    }
                };
                let hint = hint.map_or(String::new(), |h| format!("{h} "));
                let span = match term {
                    Term::Call { .. } => ident.span(),
                    _ => ident.span(),
                };
                errors.at(span, format!("unknown mask `{text}`; {hint}{MASK_FORMS}"));
                ok = false;
            }
            other => {
                errors.spanned(other.to_token_stream(), MASK_FORMS);
                ok = false;
            }
        }
    }
    if let Some((left, right, align, span)) = window {
        let causal = terms.causal.map(|(align, _)| align);
        let align = match (align, causal) {
            (Some(own), Some(causal)) if own != causal => {
                errors.at(
                    span,
                    "the window's alignment differs from `causal`'s; write the alignment once, \
                     on `causal`",
                );
                ok = false;
                own
            }
            (Some(own), _) => own,
            (None, Some(causal)) => causal,
            (None, None) => ir::Align::TopLeft,
        };
        terms.window = Some(ir::Window { left, right, align });
    }
    ok.then_some(terms)
}

fn single_term<'a>(entry: &'a Entry, errors: &mut Errors) -> Option<&'a Term> {
    match entry.value.terms.as_slice() {
        [term] => Some(term),
        _ => {
            errors.spanned(
                &entry.value.tokens,
                format!("`{}` takes a single value", entry.key),
            );
            None
        }
    }
}

fn number(term: &Term) -> Option<f64> {
    let (minus, value) = match term {
        Term::Lit {
            minus,
            lit: Lit::Float(f),
        } => (minus, f.base10_parse::<f64>().ok()?),
        Term::Lit {
            minus,
            lit: Lit::Int(i),
        } => (minus, i.base10_parse::<f64>().ok()?),
        _ => return None,
    };
    Some(if minus.is_some() { -value } else { value })
}

fn read_bool(entry: &Entry, errors: &mut Errors) -> Option<bool> {
    match single_term(entry, errors)? {
        Term::Ident(ident) if ident == "true" => Some(true),
        Term::Ident(ident) if ident == "false" => Some(false),
        other => {
            errors.spanned(
                other.to_token_stream(),
                format!("`{}` expects `true` or `false`", entry.key),
            );
            None
        }
    }
}

fn read_choice<'a>(
    entry: &Entry,
    what: &str,
    choices: &[&'a str],
    aliases: &[(&str, &'a str)],
    errors: &mut Errors,
) -> Option<&'a str> {
    let term = single_term(entry, errors)?;
    let Term::Ident(ident) = term else {
        errors.spanned(
            term.to_token_stream(),
            format!("`{}` expects one of {}", entry.key, list(choices)),
        );
        return None;
    };
    let text = ident.to_string();
    if let Some(choice) = choices.iter().find(|c| **c == text) {
        return Some(choice);
    }
    let hint = aliases
        .iter()
        .find(|(alias, _)| *alias == text)
        .map(|(_, choice)| *choice)
        .or_else(|| suggest::nearest(&text, choices))
        .map_or(String::new(), |s| format!("did you mean `{s}`? "));
    errors.at(
        ident.span(),
        format!(
            "unknown {what} `{text}`; {hint}expected one of {}",
            list(choices)
        ),
    );
    None
}

/// The options; a wrong one is reported and left at Flax's default.
fn read_options(entries: &BTreeMap<&'static str, &Entry>, errors: &mut Errors) -> Options {
    let mut options = Options {
        dtype: DType::F32,
        dropout_rate: 0.0,
        broadcast_dropout: true,
        precision: Precision::Default,
        force_fp32_for_softmax: false,
        sow: false,
        scale: None,
    };
    if let Some(entry) = entries.get("dropout_rate")
        && let Some(term) = single_term(entry, errors)
    {
        match number(term) {
            Some(rate) if (0.0..1.0).contains(&rate) => options.dropout_rate = rate,
            Some(rate) => {
                errors.spanned(
                    term.to_token_stream(),
                    format!(
                        "`dropout_rate` must be in [0, 1) (the fraction of weights dropped); \
                         found {rate}"
                    ),
                );
            }
            None => {
                errors.spanned(
                    term.to_token_stream(),
                    "`dropout_rate` expects a number in [0, 1), such as `0.1`",
                );
            }
        }
    }
    if let Some(entry) = entries.get("scale")
        && let Some(term) = single_term(entry, errors)
    {
        match number(term) {
            Some(scale) if scale.is_finite() && scale > 0.0 => options.scale = Some(scale),
            _ => {
                errors.spanned(
                    term.to_token_stream(),
                    "`scale` expects a positive number, such as `0.125` \
                     (the default is `1 / sqrt(depth)`)",
                );
            }
        }
    }
    for (key, slot) in [
        ("broadcast_dropout", &mut options.broadcast_dropout),
        (
            "force_fp32_for_softmax",
            &mut options.force_fp32_for_softmax,
        ),
    ] {
        if let Some(entry) = entries.get(key)
            && let Some(value) = read_bool(entry, errors)
        {
            *slot = value
        }
    }
    if let Some(entry) = entries.get("dtype")
        && let Some(term) = single_term(entry, errors)
    {
        match read_dtype(term, errors) {
            Some("f32") => options.dtype = DType::F32,
            Some("f64") => options.dtype = DType::F64,
            Some("bf16") => options.dtype = DType::BF16,
            Some(_) => options.dtype = DType::F16,
            None => {}
        }
    }
    if let Some(entry) = entries.get("precision") {
        let aliases = [
            ("DEFAULT", "default"),
            ("HIGH", "high"),
            ("HIGHEST", "highest"),
            ("Default", "default"),
            ("High", "high"),
            ("Highest", "highest"),
        ];
        let foreign = entry
            .value
            .terms
            .as_slice()
            .first()
            .and_then(|term| match term {
                Term::Other(tokens) if entry.value.terms.len() == 1 => {
                    dotted_path(tokens).map(|path| (tokens, path))
                }
                _ => None,
            });
        let choice = match foreign {
            // `jax.lax.Precision.HIGHEST`, `lax.Precision.HIGH`
            Some((tokens, path)) => {
                let last = path.last().map_or("", String::as_str);
                let hint = aliases
                    .iter()
                    .find(|(alias, _)| *alias == last)
                    .map_or(format!("one of {}", list(PRECISIONS)), |(_, choice)| {
                        format!("`precision: {choice}`")
                    });
                errors.spanned(
                    tokens,
                    format!(
                        "`{}` is JAX's spelling of the precision; write {hint}",
                        path.join(".")
                    ),
                );
                None
            }
            None => read_choice(entry, "precision", PRECISIONS, &aliases, errors),
        };
        match choice {
            Some("default") => options.precision = Precision::Default,
            Some("high") => options.precision = Precision::High,
            Some(_) => options.precision = Precision::Highest,
            None => {}
        }
    }
    if let Some(entry) = entries.get("sow") {
        match single_term(entry, errors) {
            Some(Term::Ident(ident)) if ident == "attention_weights" => options.sow = true,
            Some(other) => {
                errors.spanned(
                    other.to_token_stream(),
                    "`sow` takes `attention_weights`: the layer then sows its weights into the \
                     context's sink under Flax's (\"intermediates\", \"attention_weights\"); \
                     leave `sow` out to sow nothing",
                );
            }
            None => {}
        }
    }
    if options.dtype == DType::F64
        && options.force_fp32_for_softmax
        && options.dropout_rate > 0.0
        && let Some(entry) = entries.get("force_fp32_for_softmax")
    {
        errors.at(
            entry.key.span(),
            "with `dtype: f64`, `force_fp32_for_softmax` and a `dropout_rate`, Flax returns \
                 float32 weights without dropout but float64 weights with it; a layer's weights \
                 have one type, so choose two of the three",
        );
    }
    options
}

/// `jnp.bfloat16`, `torch::float32`: the names of a path written with `.` or `::`, if `tokens`
/// is one (at least two names).
fn dotted_path(tokens: &TokenStream) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut expect_name = true;
    for tree in tokens.clone() {
        match tree {
            proc_macro2::TokenTree::Ident(ident) if expect_name => {
                names.push(ident.to_string());
                expect_name = false;
            }
            proc_macro2::TokenTree::Punct(p) if p.as_char() == '.' && !expect_name => {
                expect_name = true;
            }
            proc_macro2::TokenTree::Punct(p) if p.as_char() == ':' => {
                if p.spacing() == proc_macro2::Spacing::Alone {
                    expect_name = true;
                }
            }
            _ => return None,
        }
    }
    (names.len() >= 2 && !expect_name).then_some(names)
}

/// The dtype spellings of NumPy, JAX, PyTorch and C, and attn's name for each.
const DTYPE_ALIASES: &[(&str, &str)] = &[
    ("float32", "f32"),
    ("float64", "f64"),
    ("bfloat16", "bf16"),
    ("float16", "f16"),
    ("half", "f16"),
    ("double", "f64"),
    ("float", "f32"),
    ("single", "f32"),
    ("float_", "f64"),
    ("F32", "f32"),
    ("F64", "f64"),
    ("BF16", "bf16"),
    ("F16", "f16"),
];

/// Whose spelling a dtype path is, from its first name.
fn framework(first: &str) -> &'static str {
    match first {
        "jnp" | "jax" => "JAX's",
        "np" | "numpy" => "NumPy's",
        "torch" => "PyTorch's",
        "tf" | "tensorflow" => "TensorFlow's",
        "ml_dtypes" => "ml_dtypes'",
        "half" => "the `half` crate's",
        _ => "another library's",
    }
}

/// `dtype: ..`: one of [`DTYPES`]; other libraries' spellings name attn's.
fn read_dtype(term: &Term, errors: &mut Errors) -> Option<&'static str> {
    let expected = format!("expected one of {}", list(DTYPES));
    let not_float = |name: &str| {
        name.starts_with("int")
            || name.starts_with("uint")
            || name.starts_with("complex")
            || name.starts_with("float8")
            || name.starts_with('i') && name[1..].parse::<u32>().is_ok()
            || name.starts_with('u') && name[1..].parse::<u32>().is_ok()
            || name == "bool"
            || name == "bool_"
    };
    let alias = |name: &str| {
        DTYPE_ALIASES
            .iter()
            .find(|(alias, _)| *alias == name)
            .map(|(_, dtype)| *dtype)
            .or_else(|| DTYPES.iter().find(|d| **d == name).copied())
    };
    match term {
        Term::Ident(ident) => {
            let text = ident.to_string();
            if let Some(dtype) = DTYPES.iter().find(|d| **d == text) {
                return Some(dtype);
            }
            let message = if let Some(dtype) = alias(&text) {
                format!(
                    "`{text}` is the NumPy/JAX name of the dtype; attn writes Rust's: `dtype: {dtype}`"
                )
            } else if not_float(&text) {
                format!(
                    "attn computes attention in floating point; `{text}` is not a floating-point dtype: {expected}"
                )
            } else {
                let hint = suggest::nearest(&text, DTYPES)
                    .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                format!("unknown dtype `{text}`; {hint}{expected}")
            };
            errors.at(ident.span(), message);
        }
        Term::Lit {
            lit: Lit::Str(string),
            ..
        } => {
            let text = string.value();
            let name = text.rsplit(['.', ':']).next().unwrap_or(&text);
            let message = match alias(name) {
                Some(dtype) => format!("the dtype is a name, not a string: `dtype: {dtype}`"),
                None => format!("the dtype is a name, not a string; {expected}"),
            };
            errors.at(string.span(), message);
        }
        Term::Other(tokens) if dotted_path(tokens).is_some() => {
            let path = dotted_path(tokens).unwrap_or_default();
            let last = path.last().map_or("", String::as_str);
            let whose = framework(&path[0]);
            let written = path.join(".");
            let message = match alias(last) {
                Some(dtype) => format!(
                    "`{written}` is {whose} spelling of the dtype; attn writes Rust's: `dtype: {dtype}`"
                ),
                None => format!(
                    "`{written}` is {whose} spelling of a dtype, which attn does not compute in; {expected}"
                ),
            };
            errors.spanned(tokens, message);
        }
        other => {
            errors.spanned(
                other.to_token_stream(),
                format!("`dtype` {expected}, such as `dtype: bf16`"),
            );
        }
    }
    None
}

/// Names people give the heads; one in the length position means another framework's layout.
const HEADS_NAMES: &[&str] = &[
    "H",
    "h",
    "heads",
    "Heads",
    "HEADS",
    "num_heads",
    "n_heads",
    "n_head",
    "nh",
    "NH",
    "NumHeads",
    "nheads",
    "kv_heads",
    "num_kv_heads",
    "n_kv_heads",
];

/// Names people give a sequence length; one in the heads position means another layout.
const LENGTH_NAMES: &[&str] = &[
    "T", "S", "L", "seq", "Seq", "SEQ", "seq_len", "SeqLen", "len", "Len", "LEN", "length",
    "q_len", "kv_len", "tokens", "time", "Tq", "Tk", "Lq", "Lk", "Sq", "Sk",
];

/// Names people give the batch.
const BATCH_NAMES: &[&str] = &["B", "batch", "Batch", "BATCH", "bs", "bsz", "batch_size"];

fn dim_text(dim: &DimSyntax) -> String {
    match dim {
        DimSyntax::Named(name) => name.to_string(),
        DimSyntax::Bound { name, size } => format!("{name} = {}", written(&size.to_token_stream())),
        DimSyntax::Size(lit) => lit.to_string(),
        DimSyntax::Malformed(tokens, _) => written(tokens),
    }
}

/// Tokens whose span runs from `start` to `end` (for an error covering several dims).
fn span_range(start: Span, end: Span) -> TokenStream {
    let mut first = proc_macro2::Punct::new('.', proc_macro2::Spacing::Alone);
    first.set_span(start);
    let mut last = proc_macro2::Punct::new('.', proc_macro2::Spacing::Alone);
    last.set_span(end);
    [
        proc_macro2::TokenTree::Punct(first),
        proc_macro2::TokenTree::Punct(last),
    ]
    .into_iter()
    .collect()
}

/// Reports `query`, `key` or `value` written in another framework's layout: PyTorch's
/// `[batch, heads, len, depth]` (a heads name in the length position, a length name in the heads
/// position, or the length position's name used as heads by another tensor) or the time-major
/// `[len, batch, heads, depth]`. Returns, for each of `shapes`, whether it was reported.
fn check_layouts(
    shapes: &[Option<&ShapeEntry>],
    broadcast: &[&ShapeEntry],
    errors: &mut Errors,
) -> Vec<bool> {
    let name_at = |shape: &ShapeEntry, i: usize| match &shape.dims[i].axis {
        Some(Axis::Named(name)) => Some(name.to_string()),
        _ => None,
    };
    let is =
        |name: &Option<String>, names: &[&str]| name.as_deref().is_some_and(|n| names.contains(&n));
    // Named like PyTorch's layout: such a tensor's heads position says nothing about the others.
    let by_name: Vec<bool> = shapes
        .iter()
        .map(|shape| {
            shape.is_some_and(|shape| {
                let rank = shape.dims.len();
                is(&name_at(shape, rank - 3), HEADS_NAMES)
                    || is(&name_at(shape, rank - 2), LENGTH_NAMES)
            })
        })
        .collect();
    let mut reported = vec![false; shapes.len()];
    for (index, shape) in shapes.iter().enumerate() {
        let Some(shape) = shape else { continue };
        let rank = shape.dims.len();
        let (len_at, heads_at) = (rank - 3, rank - 2);
        let len_name = name_at(shape, len_at);
        let heads_name = name_at(shape, heads_at);
        // Another tensor that has the length position's name as its heads.
        let heads_of = len_name.as_ref().and_then(|len| {
            // Two tensors with their length and heads swapped against each other (and neutral
            // names) do not say which one is wrong: no layout error for them.
            let qkv = shapes.iter().enumerate().filter_map(|(other, s)| {
                let s = (*s)?;
                let rank = s.dims.len();
                let mutual = name_at(s, rank - 3).is_some() && name_at(s, rank - 3) == heads_name;
                (other != index
                    && !by_name[other]
                    && !mutual
                    && name_at(s, rank - 2).as_ref() == Some(len))
                .then(|| s.entry.key.to_string())
            });
            // The logits have as many dims as `query`; a longer bias or mask is an error of
            // its own, and its dims do not line up.
            let logits_rank = shapes[0].map_or(0, |query| query.dims.len());
            let logits = broadcast.iter().filter_map(|s| {
                (s.dims.len() >= 3
                    && s.dims.len() <= logits_rank
                    && name_at(s, s.dims.len() - 3).as_ref() == Some(len))
                .then(|| s.entry.key.to_string())
            });
            qkv.chain(logits).next()
        });
        let key = &shape.entry.key;
        let dims = &shape.shape.dims;
        let swapped = |a: usize, b: usize| {
            let mut texts: Vec<String> = dims.iter().map(dim_text).collect();
            texts.swap(a, b);
            format!("[{}]", texts.join(", "))
        };
        let pytorch_reason = if let Some(other) = &heads_of {
            Some(format!(
                "`{}` stands where the length goes and is the heads of `{other}`",
                len_name.as_deref().unwrap_or_default()
            ))
        } else if is(&len_name, HEADS_NAMES) {
            Some(format!(
                "`{}` names the heads but stands where the length goes",
                len_name.as_deref().unwrap_or_default()
            ))
        } else if is(&heads_name, LENGTH_NAMES) {
            Some(format!(
                "`{}` names a length but stands where the heads go",
                heads_name.as_deref().unwrap_or_default()
            ))
        } else {
            None
        };
        if let Some(reason) = pytorch_reason {
            errors.spanned(
                span_range(shape.dims[len_at].span, shape.dims[heads_at].span),
                format!(
                    "`{key}` looks like PyTorch's layout `[batch, heads, len, depth]` ({reason}); \
                     attn follows Flax: `[batch.., len, heads, depth]`, so write \
                     `{key}: {}`",
                    swapped(len_at, heads_at)
                ),
            );
            reported[index] = true;
        } else if rank >= 4 && is(&len_name, BATCH_NAMES) && is(&name_at(shape, 0), LENGTH_NAMES) {
            errors.spanned(
                span_range(shape.dims[0].span, shape.dims[len_at].span),
                format!(
                    "`{key}` looks like the time-major layout `[len, batch, heads, depth]` \
                     (Megatron-LM, fairseq): `{}` names the batch but stands where the length \
                     goes; attn follows Flax: `[batch.., len, heads, depth]`, so write \
                     `{key}: {}`",
                    len_name.as_deref().unwrap_or_default(),
                    swapped(0, len_at)
                ),
            );
            reported[index] = true;
        }
    }
    reported
}

/// What a bias or mask dim must match: `[batch.., heads, q_len, kv_len]` of the logits.
struct Targets {
    /// `(axis, description)`, outermost first.
    axes: Vec<(Option<Axis>, String)>,
}

impl Targets {
    fn new(query: &ShapeEntry, key: &ShapeEntry) -> Targets {
        let rank = query.dims.len();
        let batch = rank - 3;
        let mut axes: Vec<(Option<Axis>, String)> = query.dims[..batch]
            .iter()
            .enumerate()
            .map(|(i, d)| (d.axis.clone(), format!("batch dim {} of `query`", i + 1)))
            .collect();
        axes.push((
            query.dims[rank - 2].axis.clone(),
            "the heads of `query`".into(),
        ));
        axes.push((
            query.dims[rank - 3].axis.clone(),
            "the length of `query`".into(),
        ));
        let key_rank = key.dims.len();
        axes.push((
            key.dims[key_rank - 3].axis.clone(),
            "the length of `key`".into(),
        ));
        Targets { axes }
    }
}

/// Cross-shape checks.
struct Structure<'t> {
    table: &'t DimTable,
}

fn show(axis: &Axis) -> String {
    match axis {
        Axis::Named(name) => format!("`{name}`"),
        Axis::Size(n) => format!("`{n}`"),
    }
}

impl Structure<'_> {
    /// Two dims are the same if they have the same name or the same static size.
    fn same(&self, a: &Axis, b: &Axis) -> bool {
        let size = |axis: &Axis| match axis {
            Axis::Named(name) => self.table.size_of(name),
            Axis::Size(n) => Some(*n),
        };
        match (a, b) {
            (Axis::Named(x), Axis::Named(y)) if x == y => true,
            _ => matches!((size(a), size(b)), (Some(x), Some(y)) if x == y),
        }
    }

    fn rank(&self, name: &str, shape: &ShapeEntry, errors: &mut Errors) -> bool {
        let rank = shape.dims.len();
        if shape.dims.iter().any(|dim| dim.axis.is_none()) {
            // A malformed dim (already reported) may hide or merge dims: no rank error now.
            return (3..=MAX_RANK).contains(&rank);
        }
        if rank < 3 {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` needs at least 3 dims, `[len, heads, depth]` after any batch dims; \
                     found {rank}"
                ),
            );
            false
        } else if rank > MAX_RANK {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {rank} dims; at most {MAX_RANK} are supported \
                     ({} batch dims)",
                    MAX_RANK - 3
                ),
            );
            false
        } else {
            true
        }
    }

    /// Whether the number of batch dims agrees (the dims themselves are reported one by one).
    fn same_batch(
        &self,
        name: &str,
        shape: &ShapeEntry,
        query: &ShapeEntry,
        errors: &mut Errors,
    ) -> bool {
        let batch = shape.dims.len() - 3;
        let query_batch = query.dims.len() - 3;
        if batch != query_batch {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {batch} batch dims but `query` has {query_batch}; \
                     the batch dims of query, key and value must be the same"
                ),
            );
            return false;
        }
        for (i, (dim, query_dim)) in shape.dims.iter().zip(&query.dims).take(batch).enumerate() {
            if let (Some(axis), Some(query_axis)) = (&dim.axis, &query_dim.axis)
                && !self.same(axis, query_axis)
            {
                errors.at(
                    dim.span,
                    format!(
                        "batch dim {} of `{name}` is {} but `query` has {} there; \
                             the batch dims of query, key and value must be the same",
                        i + 1,
                        show(axis),
                        show(query_axis)
                    ),
                );
            }
        }
        true
    }

    fn size(&self, axis: &Axis) -> Option<usize> {
        match axis {
            Axis::Named(name) => self.table.size_of(name),
            Axis::Size(n) => Some(*n),
        }
    }

    /// The heads of `key` against those of `query`: the same, or (grouped-query attention) a
    /// divisor. When both are static and do not divide, an error at `key`'s heads. Returns the
    /// span of `key`'s heads if they differ from `query`'s (and are not an error).
    fn kv_heads(&self, key: &ShapeEntry, query: &ShapeEntry, errors: &mut Errors) -> Option<Span> {
        let dim = &key.dims[key.dims.len() - 2];
        let query_dim = &query.dims[query.dims.len() - 2];
        let (Some(axis), Some(query_axis)) = (&dim.axis, &query_dim.axis) else {
            return None;
        };
        if self.same(axis, query_axis) {
            return None;
        }
        let described = |axis: &Axis| match (axis, self.size(axis)) {
            (Axis::Named(name), Some(n)) => format!("`{name}` = {n}"),
            (axis, _) => show(axis),
        };
        match (self.size(axis), self.size(query_axis)) {
            (Some(kv), Some(heads)) if kv == 0 || heads % kv != 0 => {
                errors.at(
                    dim.span,
                    format!(
                        "`key` has {} heads, which does not divide the {} heads of `query`; \
                         grouped-query attention needs the key/value heads to divide the query \
                         heads (query head `n` reads key/value head `n / (heads / kv_heads)`)",
                        described(axis),
                        described(query_axis)
                    ),
                );
                None
            }
            _ => Some(dim.span),
        }
    }

    /// Compares dim `from_end` (0 = last) of `shape` with dim `other_from_end` of `other`.
    #[allow(clippy::too_many_arguments)]
    fn same_axis(
        &self,
        shape: &ShapeEntry,
        from_end: usize,
        what: &str,
        other: &ShapeEntry,
        other_from_end: usize,
        other_what: &str,
        errors: &mut Errors,
    ) {
        let dim = &shape.dims[shape.dims.len() - 1 - from_end];
        let other_dim = &other.dims[other.dims.len() - 1 - other_from_end];
        if let (Some(axis), Some(other_axis)) = (&dim.axis, &other_dim.axis)
            && !self.same(axis, other_axis)
        {
            errors.at(
                dim.span,
                format!(
                    "`{}` has {what} {} but `{}` has {other_what} {}; \
                         use the same name or size",
                    shape.entry.key,
                    show(axis),
                    other.entry.key,
                    show(other_axis)
                ),
            );
        }
    }

    fn broadcast(&self, name: &str, shape: &ShapeEntry, targets: &Targets, errors: &mut Errors) {
        let rank = shape.dims.len();
        let max = targets.axes.len();
        if rank > max {
            errors.at(
                shape.shape.span,
                format!(
                    "`{name}` has {rank} dims but the logits `[batch.., heads, q_len, kv_len]` \
                     have {max}; a {name} may have fewer dims, not more"
                ),
            );
            return;
        }
        let offset = max - rank;
        for (dim, (target, what)) in shape.dims.iter().zip(&targets.axes[offset..]) {
            let (Some(axis), Some(target)) = (&dim.axis, target) else {
                continue;
            };
            if matches!(axis, Axis::Size(1)) || self.same(axis, target) {
                continue;
            }
            errors.at(
                dim.span,
                format!(
                    "this `{name}` dim must be `1` or {} ({what}); found {}",
                    show(target),
                    show(axis)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use quote::quote;

    fn messages(tokens: TokenStream) -> Vec<String> {
        let input = parse(tokens).expect("parses");
        match validate(&input) {
            Ok(_) => Vec::new(),
            Err(error) => error.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_correct_declaration_validates() {
        let input = parse(quote! {
            pub struct Gpt2 {
                query: [B, T, H = 12, D = 64],
                key: [B, T, H, D],
                value: [B, T, H, D],
                mask: causal,
                dropout_rate: 0.1,
                dtype: f32,
                sow: attention_weights,
            }
        })
        .unwrap();
        let layers = validate(&input).unwrap_or_else(|e| panic!("{e}"));
        let layer = &layers[0];
        assert_eq!(layer.dims.len(), 4);
        assert_eq!(layer.dims[2].size, Some(12));
        assert_eq!(layer.dims[0].size, None);
        assert_eq!(layer.mask.causal, Some(ir::Align::TopLeft));
        assert!(layer.options.sow);
    }

    /// Messages of a declaration given as source text (so spans have real positions).
    fn messages_of(source: &str) -> Vec<String> {
        messages(source.parse().expect("lexes"))
    }

    fn assert_messages(found: &[String], expected: &[&str]) {
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (found, expected) in found.iter().zip(expected) {
            assert!(found.starts_with(expected), "{found:?} vs {expected:?}");
        }
    }

    #[test]
    fn every_mistake_is_reported_in_source_order() {
        let found = messages_of(
            "struct L {
                query: [B, T, H, D],
                key: [B, S, H, E],
                dropuot_rate: 0.1,
                dtype: float32,
                dtype: f32,
                bias: [X, T, S],
            }",
        );
        assert_messages(
            &found,
            &[
                "`key` has depth `E` but `query` has depth `D`",
                "unknown option `dropuot_rate`; did you mean `dropout_rate`?",
                "`float32` is the NumPy/JAX name of the dtype; attn writes Rust's: `dtype: f32`",
                "duplicate `dtype`",
                "`dtype` first set here",
                "this `bias` dim must be `1` or `H` (the heads of `query`); found `X`",
            ],
        );
    }

    #[test]
    fn sizes_and_ranks() {
        let found = messages_of(
            "struct L {
                query: [B, T, H = 12, D],
                key: [C, S, H = 8, X],
                value: [B, R, H, D],
                mask: [B, B, 1, T, S, S],
                dropout_rate: 1.0,
            }",
        );
        assert_messages(
            &found,
            &[
                "batch dim 1 of `key` is `C` but `query` has `B` there",
                "`H` is bound to two sizes: 8 here and 12 above",
                "`H` first bound to 12 here",
                "`key` has depth `X` but `query` has depth `D`",
                "`value` has length `R` but `key` has length `S`",
                "`mask` has 6 dims but the logits",
                "`dropout_rate` must be in [0, 1)",
            ],
        );
    }

    #[test]
    fn missing_query_and_key() {
        let found = messages(quote! { struct L { value: [B, S, H, D] } });
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("`L` has no `query` and no `key`"));
        let found = messages(quote! { struct L { queries: [T, H, D], key: [S, H, D] } });
        assert_eq!(
            found.len(),
            1,
            "a misspelt query is reported once: {found:?}"
        );
        assert!(found[0].starts_with("unknown option `queries`; did you mean `query`?"));
    }

    #[test]
    fn foreign_spellings_name_their_cause() {
        let found = messages_of(
            "struct L {
                query: [B, T, H, D];
                key: [B, S, H, D],
                value: [B S H D],
                dtype: jnp.bfloat16,
                precision: jax.lax.Precision.HIGHEST,
            }",
        );
        assert_messages(
            &found,
            &[
                "entries are separated by `,`, not `;`",
                "expected `,` between dims: `[B, S, H, D]`",
                "`jnp.bfloat16` is JAX's spelling of the dtype; attn writes Rust's: `dtype: bf16`",
                "`jax.lax.Precision.HIGHEST` is JAX's spelling of the precision; write `precision: highest`",
            ],
        );
        for (dtype, expected) in [
            (
                "np.float16",
                "`np.float16` is NumPy's spelling of the dtype; attn writes Rust's: `dtype: f16`",
            ),
            (
                "torch.float32",
                "`torch.float32` is PyTorch's spelling of the dtype; attn writes Rust's: `dtype: f32`",
            ),
            (
                "torch::int8",
                "`torch.int8` is PyTorch's spelling of a dtype, which attn does not compute in",
            ),
            (
                "\"float32\"",
                "the dtype is a name, not a string: `dtype: f32`",
            ),
            (
                "int8",
                "attn computes attention in floating point; `int8` is not",
            ),
            (
                "bfloat16",
                "`bfloat16` is the NumPy/JAX name of the dtype; attn writes Rust's: `dtype: bf16`",
            ),
        ] {
            let found = messages_of(&format!(
                "struct L {{ query: [T, H, D], key: [S, H, D], dtype: {dtype} }}"
            ));
            assert_messages(&found, &[expected]);
        }
    }

    #[test]
    fn foreign_layouts_are_named_once() {
        // PyTorch's layout by names, and through the bias's heads.
        let found = messages_of(
            "struct L {
                query: [B, H = 8, T, D = 64],
                key: [B, H, S, D],
                value: [B, H, S, D],
            }",
        );
        assert_messages(
            &found,
            &[
                "`query` looks like PyTorch's layout `[batch, heads, len, depth]` (`H` names the heads but stands where the length goes); attn follows Flax: `[batch.., len, heads, depth]`, so write `query: [B, T, H = 8, D = 64]`",
                "`key` looks like PyTorch's layout",
                "`value` looks like PyTorch's layout",
            ],
        );
        let found =
            messages_of("struct L { query: [B, N, L, E], key: [B, N, M, E], bias: [B, N, L, M] }");
        assert_messages(
            &found,
            &[
                "`query` looks like PyTorch's layout `[batch, heads, len, depth]` (`N` stands where the length goes and is the heads of `bias`)",
                "`key` looks like PyTorch's layout",
            ],
        );
        let found = messages_of(
            "struct L { query: [batch, heads, seq, depth], key: [batch, seq, heads, depth] }",
        );
        assert_messages(&found, &["`query` looks like PyTorch's layout"]);
        let found = messages_of("struct L { query: [T, B, H, D], key: [S, B, H, D] }");
        assert_messages(
            &found,
            &[
                "`query` looks like the time-major layout `[len, batch, heads, depth]`",
                "`key` looks like the time-major layout",
            ],
        );
        // Flax's layout with any names is not flagged.
        assert!(
            messages_of(
                "struct L { query: [batch, seq, heads, depth], key: [batch, kv, heads, depth] }"
            )
            .is_empty()
        );
    }

    #[test]
    fn static_size_zero() {
        let found = messages_of("struct L { query: [B, T, H = 0, D], key: [B, S, H, 0] }");
        assert_messages(
            &found,
            &[
                "a static size of 0 would make every tensor with this dim empty; a static size is at least 1 (write `H` without a size",
                "a static size of 0 would make every tensor with this dim empty; a static size is at least 1 (write a name such as `T`",
            ],
        );
    }

    #[test]
    fn grouped_query_heads() {
        let found = messages_of(
            "struct L { query: [B, T, H = 32, D = 128], key: [B, S, G = 5, D], value: [B, S, G, D] }",
        );
        assert_messages(
            &found,
            &["`key` has `G` = 5 heads, which does not divide the `H` = 32 heads of `query`"],
        );
        let found = messages_of(
            "struct L { query: [B, T, H = 32, D = 128], key: [B, S, G = 8, D], value: [B, S, H, D] }",
        );
        let gated = usize::from(!STRUCTURES);
        assert_eq!(found.len(), 1 + gated, "{found:#?}");
        assert!(found[gated].starts_with("`value` has heads `H` but `key` has heads `G`"));
        for source in [
            "struct L { query: [B, T, H = 32, D = 128], key: [B, S, G = 8, D], value: [B, S, G, D] }",
            "struct L { query: [B, T, H, D], key: [B, S, G, D], value: [B, S, G, D] }",
            "struct L { query: [T, H, D], key: [S, 1, D] }",
        ] {
            let found = messages_of(source);
            if STRUCTURES {
                assert!(found.is_empty(), "{found:#?}");
            } else {
                assert_messages(
                    &found,
                    &[
                        "key/value heads other than the query heads (grouped-query attention): not yet supported",
                    ],
                );
            }
        }
    }

    /// Validates with the structures allowed, whatever [`STRUCTURES`] says (the errors of a
    /// declaration other than "not yet supported").
    fn structure_messages(source: &str) -> Vec<String> {
        messages_of(source)
            .into_iter()
            .filter(|m| !m.contains("not yet supported"))
            .collect()
    }

    #[test]
    fn mask_structures() {
        let ok = "struct L {
            query: [B, T, H = 32, D = 128],
            key: [B, S, G = 8, D],
            value: [B, S, G, D],
            mask: causal(bottom_right) + window(4096, 0) + query_lengths + kv_lengths + segment_ids + [B, 1, T, S],
        }";
        assert!(structure_messages(ok).is_empty(), "{:#?}", messages_of(ok));
        if !STRUCTURES {
            assert_eq!(messages_of(ok).len(), 6, "{:#?}", messages_of(ok));
        }
        let found = structure_messages(
            "struct L {
                query: [T, H, D],
                key: [S, H, D],
                mask: causal(lower_right) + window(512) + lengths + window(1, -2) + segments + causal(3) + causal(offset = x),
            }",
        );
        assert_messages(
            &found,
            &[
                "unknown alignment `lower_right`; did you mean `bottom_right`?",
                "`window` takes both sides: `window(512, 0)` sees 512 keys back",
                "unknown mask `lengths`; write `kv_lengths`",
                "the right side of a window cannot be negative",
                "unknown mask `segments`; did you mean `segment_ids`?",
                "write the offset as `offset = 3`",
                "`offset` takes an integer",
            ],
        );
        let found = structure_messages(
            "struct L { query: [T, H, D], key: [S, H, D], mask: causal + causal(bottom_right) + window(8, 8, top_left) + kv_lengths + kv_lengths }",
        );
        assert_messages(
            &found,
            &[
                "`causal` appears twice in this mask",
                "`causal` first written here",
                "`kv_lengths` appears twice in this mask",
                "`kv_lengths` first written here",
            ],
        );
        let found = structure_messages(
            "struct L { query: [T, H, D], key: [S, H, D], mask: causal(bottom_right) + window(8, 0, top_left) }",
        );
        assert_messages(&found, &["the window's alignment differs from `causal`'s"]);
    }
}
