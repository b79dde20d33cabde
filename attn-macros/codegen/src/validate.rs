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
                if ok {
                    match value {
                        Some((n, span)) => table.bind(name, n, span, errors),
                        None => table.use_name(name),
                    }
                }
                (ok.then(|| Axis::Named(name.clone())), name.span())
            }
            DimSyntax::Size(lit) => (parse_size(lit, errors).map(Axis::Size), lit.span()),
            DimSyntax::Malformed(tokens, span) => {
                let semicolon = tokens
                    .clone()
                    .into_iter()
                    .any(|t| matches!(t, proc_macro2::TokenTree::Punct(p) if p.as_char() == ';'));
                if tokens.is_empty() {
                    errors.at(*span, format!("missing dim before this `,`: {DIM_FORMS}"));
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
    if let (Some(query), Some(key), true, true) = (&query, &key, query_ok, key_ok) {
        // With another number of batch dims, the other dims may be shifted: one error is enough.
        let key_batch_ok = check.same_batch("key", key, query, errors);
        if key_batch_ok {
            check.same_axis(key, 1, "heads", query, 1, "heads", errors);
            check.same_axis(key, 0, "depth", query, 0, "depth", errors);
        }
        if let (Some(value), true) = (&value, value_ok) {
            // Compared with `query` where possible, so a mistake in `key` is reported once.
            if check.same_batch("value", value, query, errors) {
                check.same_axis(value, 1, "heads", query, 1, "heads", errors);
                if key_batch_ok {
                    check.same_axis(value, 2, "length", key, 2, "length", errors);
                }
            }
        }
        let targets = Targets::new(query, key);
        if let Some(bias) = &bias {
            check.broadcast("bias", bias, &targets, errors);
        }
        if let Some((_, Some(explicit))) = &mask {
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
    let (causal, explicit) = mask.unwrap_or((false, None));
    Some(Layer {
        docs: syntax.attrs.clone(),
        vis: syntax.vis.clone(),
        ident: syntax.ident.clone(),
        line: line_of(syntax.struct_token.span),
        dims: table.dims,
        query: operand("query", query?),
        key: operand("key", key?),
        value: value.map(|v| operand("value", v)),
        bias: bias.map(|b| operand("bias", b)),
        mask: ir::Mask {
            causal,
            explicit: explicit.map(|m| operand("mask", m)),
            line: entries
                .get("mask")
                .map_or(0, |entry| line_of(entry.key.span())),
        },
        options,
    })
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

/// `mask: causal`, `mask: [..]`, `mask: causal + [..]`.
fn read_mask<'a>(
    entry: &'a Entry,
    table: &mut DimTable,
    errors: &mut Errors,
) -> Option<(bool, Option<ShapeEntry<'a>>)> {
    let mut causal: Option<Span> = None;
    let mut explicit: Option<ShapeEntry> = None;
    let mut ok = true;
    for term in &entry.value.terms {
        match term {
            Term::Ident(ident) if ident == "causal" => {
                if causal.is_some() {
                    errors.at(ident.span(), "`causal` appears twice in this mask");
                    ok = false;
                }
                causal = Some(ident.span());
            }
            Term::Shape(shape) => {
                let dims = read_dims(shape, table, errors);
                if explicit.is_some() {
                    errors.at(
                        shape.span,
                        "a layer takes one mask tensor; combine masks before the call, \
                         or join `causal` and one tensor: `mask: causal + [B, 1, 1, S]`",
                    );
                    ok = false;
                } else {
                    explicit = Some(ShapeEntry { entry, shape, dims });
                }
            }
            Term::Ident(ident) => {
                let hint = suggest::nearest(&ident.to_string(), &["causal"])
                    .map_or(String::new(), |s| format!("did you mean `{s}`? "));
                errors.at(
                    ident.span(),
                    format!(
                        "unknown mask `{ident}`; {hint}a mask is `causal`, a shape such as \
                         `[B, 1, 1, S]`, or both joined by `+`"
                    ),
                );
                ok = false;
            }
            other => {
                errors.spanned(
                    other.to_token_stream(),
                    "a mask is `causal`, a shape such as `[B, 1, 1, S]`, or both joined by `+`",
                );
                ok = false;
            }
        }
    }
    ok.then_some((causal.is_some(), explicit))
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
    if let Some(entry) = entries.get("dtype") {
        let aliases = [
            ("float32", "f32"),
            ("float64", "f64"),
            ("bfloat16", "bf16"),
            ("float16", "f16"),
            ("half", "f16"),
            ("double", "f64"),
            ("float", "f32"),
        ];
        match read_choice(entry, "dtype", DTYPES, &aliases, errors) {
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
        match read_choice(entry, "precision", PRECISIONS, &aliases, errors) {
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
        assert!(layer.mask.causal);
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
                key: [B, S, K, E],
                dropuot_rate: 0.1,
                dtype: float32,
                dtype: f32,
                bias: [X, T, S],
            }",
        );
        assert_messages(
            &found,
            &[
                "`key` has heads `K` but `query` has heads `H`",
                "`key` has depth `E` but `query` has depth `D`",
                "unknown option `dropuot_rate`; did you mean `dropout_rate`?",
                "unknown dtype `float32`; did you mean `f32`?",
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
}
