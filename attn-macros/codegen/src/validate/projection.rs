//! Checks a projection layer (a declaration with `inputs_q`, see [`crate::layer`]) into a
//! [`ProjectionLayer`]. Errors are collected like the attention core's: every mistake of the
//! declaration, each at its token, in one build.

use super::*;
use crate::layer::{Cache, Input, ProjectionLayer};

/// The keys of a projection layer, in the order of the grammar in docs/macro.md.
pub const PROJECTION_LAYER_KEYS: &[&str] = &[
    "inputs_q",
    "inputs_k",
    "inputs_v",
    "heads",
    "kv_heads",
    "head_dim",
    "qkv_features",
    "out_features",
    "use_bias",
    "normalize_qk",
    "mask",
    "dtype",
    "param_dtype",
    "dropout_rate",
    "broadcast_dropout",
    "precision",
    "force_fp32_for_softmax",
    "sow",
    "cache",
];

/// Validates the projection layers of an invocation; `others` are the names of the attention
/// cores declared in the same invocation (a name may be declared once). Returns the layers
/// whose declarations are right and the errors of the others.
pub fn validate_projections(
    layers: &[&LayerSyntax],
    others: &[&Ident],
) -> (Vec<ProjectionLayer>, Option<syn::Error>) {
    let mut errors = Errors::default();
    let mut names: BTreeMap<String, &Ident> = others.iter().map(|i| (i.to_string(), *i)).collect();
    let mut out = Vec::new();
    for syntax in layers {
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
        let before = errors.len();
        let layer = validate_projection(syntax, &mut errors);
        if let (Some(layer), None, true) = (layer, duplicate, errors.len() == before) {
            out.push(layer);
        }
    }
    match errors.into_result(()) {
        Ok(()) => (out, None),
        Err(error) => (out, Some(error)),
    }
}

fn unknown_projection_key(key: &str) -> String {
    let hint = match key {
        "query" | "key" | "value" | "bias" => Some(format!(
            "`{key}` declares an attention core (projected tensors); a projection layer takes \
             `inputs_q: [B, T, E = ..]` (and `inputs_k`/`inputs_v` for cross-attention)"
        )),
        "inputs" | "x" | "inputs_kv" => {
            Some("the inputs are `inputs_q`, `inputs_k` and `inputs_v`, as in Flax".to_owned())
        }
        "num_heads" => Some("write `heads: N` (Flax's `num_heads`)".to_owned()),
        "num_kv_heads" => Some("write `kv_heads: N`".to_owned()),
        "decode" | "max_length" | "kv_cache" => Some(
            "a KV cache is declared `cache: N` (capacity), `cache: dynamic` or \
             `cache: sliding_window(W)`"
                .to_owned(),
        ),
        "deterministic" | "dropout_rng" | "rng" | "seed" => Some(format!(
            "`{key}` is chosen per call: set it on the `Context` argument"
        )),
        "scale" => Some(
            "Flax's `MultiHeadDotProductAttention` always scales by `1 / sqrt(head_dim)`"
                .to_owned(),
        ),
        _ => suggest::nearest(key, PROJECTION_LAYER_KEYS)
            .map(|name| format!("did you mean `{name}`?")),
    };
    let mut message = format!("unknown option `{key}` of a projection layer");
    if let Some(hint) = hint {
        message.push_str("; ");
        message.push_str(&hint);
    }
    message.push_str(&format!(
        "\n  expected one of: {}",
        list(PROJECTION_LAYER_KEYS)
    ));
    message
}

/// A positive integer option such as `heads: 32`.
fn read_count(entry: &Entry, what: &str, errors: &mut Errors) -> Option<usize> {
    let term = single_term(entry, errors)?;
    match term {
        Term::Lit {
            minus: None,
            lit: Lit::Int(lit),
        } => match parse_size(lit, errors)? {
            0 => {
                errors.at(
                    lit.span(),
                    format!("`{}` must be at least 1 ({what})", entry.key),
                );
                None
            }
            n => Some(n),
        },
        other => {
            errors.spanned(
                other.to_token_stream(),
                format!(
                    "`{}` expects a positive integer literal ({what}), such as `{}: 8`",
                    entry.key, entry.key
                ),
            );
            None
        }
    }
}

fn divisors(n: usize) -> String {
    let list: Vec<String> = (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect();
    list.join(", ")
}

fn read_cache(entry: &Entry, errors: &mut Errors) -> Option<(Cache, Span)> {
    let term = single_term(entry, errors)?;
    let forms = "`cache` expects a capacity in tokens (`cache: 8192`), `dynamic` (the capacity \
                 is chosen when the cache is created) or `sliding_window(W)`";
    match term {
        Term::Lit {
            minus: None,
            lit: Lit::Int(lit),
        } => match parse_size(lit, errors)? {
            0 => {
                errors.at(
                    lit.span(),
                    "a cache of capacity 0 holds no token; write its capacity (at least 1) or \
                     `cache: dynamic`",
                );
                None
            }
            n => Some((Cache::Static(n), lit.span())),
        },
        Term::Ident(ident) if ident == "dynamic" => Some((Cache::Dynamic, ident.span())),
        Term::Call { name, span, args } if name == "sliding_window" => match args.as_slice() {
            [arg] => {
                let lit = syn::parse2::<LitInt>(arg.tokens.clone()).ok();
                match lit.as_ref().map(|lit| parse_size(lit, errors)) {
                    Some(Some(0)) => {
                        errors.at(
                            arg.span,
                            "a sliding window of 0 tokens sees nothing; write at least 1",
                        );
                        None
                    }
                    Some(Some(n)) => Some((Cache::SlidingWindow(n), name.span())),
                    Some(None) => None,
                    None => {
                        errors.at(
                            arg.span,
                            "`sliding_window` takes the window in tokens, an integer literal such \
                             as `sliding_window(4096)`",
                        );
                        None
                    }
                }
            }
            _ => {
                errors.at(
                    *span,
                    "`sliding_window` takes one argument, the window in tokens: \
                     `sliding_window(4096)`",
                );
                None
            }
        },
        other => {
            errors.spanned(other.to_token_stream(), forms);
            None
        }
    }
}

/// The checks of one projection layer; `None` if any failed.
fn validate_projection(syntax: &LayerSyntax, errors: &mut Errors) -> Option<ProjectionLayer> {
    let before = errors.len();
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
    // The entries by name: unknown and duplicate ones reported.
    let mut entries: BTreeMap<&'static str, &Entry> = BTreeMap::new();
    for entry in &syntax.entries {
        let key = entry.key.to_string();
        let Some(&known) = PROJECTION_LAYER_KEYS.iter().find(|k| **k == key) else {
            errors.at(entry.key.span(), unknown_projection_key(&key));
            continue;
        };
        for attr in &entry.attrs {
            if !attr.path().is_ident("doc") {
                errors.spanned(attr, "only doc comments are allowed on an entry");
            }
        }
        if let Some(first) = entries.get(known) {
            errors.with_note(
                entry.key.span(),
                format!("duplicate `{known}`: it is already set above"),
                first.key.span(),
                format!("`{known}` first set here"),
            );
        } else {
            entries.insert(known, entry);
        }
    }
    let options = read_options(&entries, errors);
    let param_dtype = entries.get("param_dtype").and_then(|entry| {
        match read_dtype(single_term(entry, errors)?, errors)? {
            "f32" => Some(DType::F32),
            "f64" => Some(DType::F64),
            "bf16" => Some(DType::BF16),
            _ => Some(DType::F16),
        }
    });
    let flag = |name: &str, default: bool, errors: &mut Errors| {
        entries
            .get(name)
            .and_then(|entry| read_bool(entry, errors))
            .unwrap_or(default)
    };
    let use_bias = flag("use_bias", true, errors);
    let normalize_qk = flag("normalize_qk", false, errors);
    let count = |name: &str, what: &str, errors: &mut Errors| {
        entries
            .get(name)
            .map(|entry| (read_count(entry, what, errors), entry.key.span()))
    };
    let heads = count("heads", "Flax's `num_heads`", errors);
    let kv_heads = count("kv_heads", "the key/value heads", errors);
    let head_dim = count("head_dim", "the features per head", errors);
    let qkv_features = count("qkv_features", "the features of q, k and v", errors);
    let out_features = count("out_features", "the output features", errors);
    let cache = entries
        .get("cache")
        .and_then(|entry| read_cache(entry, errors));

    // The inputs: `[batch.., len, features]` with static features.
    let mut table = DimTable::default();
    let read_input = |name: &'static str, errors: &mut Errors, table: &mut DimTable| {
        let entry = *entries.get(name)?;
        let shape = single_shape(entry, errors)?;
        let dims = read_dims(shape, table, errors);
        if dims.len() < 2 || dims.len() > MAX_RANK {
            errors.at(
                shape.span,
                format!(
                    "`{name}` has {} dims; expected `[batch.., length, features]`: 0 to {} batch \
                     dims, then the length and the features, e.g. `[B, T, E = 512]`",
                    dims.len(),
                    MAX_RANK - 2
                ),
            );
            return None;
        }
        let last = dims.last()?;
        match &last.axis {
            Some(Axis::Named(dim)) if table.size_of(dim).is_none() => {
                errors.at(
                    last.span,
                    format!(
                        "the features of `{name}` must be a static size, such as `{dim} = 512`: \
                         they fix the shapes of the kernels"
                    ),
                );
                return None;
            }
            None => return None,
            _ => {}
        }
        if dims.iter().any(|d| d.axis.is_none()) {
            return None;
        }
        Some(ShapeEntry { entry, shape, dims })
    };
    let inputs_q = read_input("inputs_q", errors, &mut table);
    let inputs_k = read_input("inputs_k", errors, &mut table);
    let inputs_v = read_input("inputs_v", errors, &mut table);
    let mask = entries
        .get("mask")
        .and_then(|entry| read_mask(entry, &mut table, errors));

    if !entries.contains_key("inputs_q") && syntax.errors.is_empty() {
        errors.at(
            syntax.ident.span(),
            format!(
                "`{}` has no `inputs_q`: a projection layer declares its inputs, such as \
                 `inputs_q: [B, T, E = 512]`",
                syntax.ident
            ),
        );
    }
    if !entries.contains_key("heads") && syntax.errors.is_empty() {
        errors.at(
            syntax.ident.span(),
            format!(
                "`{}` has no `heads`: a projection layer declares Flax's `num_heads`, such as \
                 `heads: 8`",
                syntax.ident
            ),
        );
    }
    if let (Some(v), None) = (entries.get("inputs_v"), entries.get("inputs_k")) {
        errors.at(
            v.key.span(),
            "`inputs_v` without `inputs_k`: Flax's `inputs_k` cannot be None when `inputs_v` is \
             given; declare `inputs_k` (the values default to the keys' inputs)",
        );
    }
    if let (Some(cache), Some(k)) = (entries.get("cache"), entries.get("inputs_k")) {
        errors.with_note(
            cache.key.span(),
            "a KV cache needs a self-attention layer (Flax decodes with `inputs_q` as keys and \
             values); remove `cache` or `inputs_k`",
            k.key.span(),
            "cross-attention declared here",
        );
    }

    // The batch dims and lengths of the inputs agree.
    let same = |a: &Option<Axis>, b: &Option<Axis>| match (a, b) {
        (Some(Axis::Named(x)), Some(Axis::Named(y))) if x == y => true,
        (Some(x), Some(y)) => {
            let size = |axis: &Axis| match axis {
                Axis::Named(name) => table.size_of(name),
                Axis::Size(n) => Some(*n),
            };
            matches!((size(x), size(y)), (Some(p), Some(q)) if p == q)
        }
        _ => true,
    };
    let show = |axis: &Option<Axis>| match axis {
        Some(Axis::Named(name)) => name.to_string(),
        Some(Axis::Size(n)) => n.to_string(),
        None => "?".to_owned(),
    };
    let batch_of = |s: &ShapeEntry| s.dims.len() - 2;
    if let Some(q) = &inputs_q {
        for other in [&inputs_k, &inputs_v].into_iter().flatten() {
            let name = other.entry.key.to_string();
            if batch_of(other) != batch_of(q) {
                errors.at(
                    other.shape.span,
                    format!(
                        "`{name}` has {} batch dims but `inputs_q` has {}; the inputs share \
                         their batch dims",
                        batch_of(other),
                        batch_of(q)
                    ),
                );
                continue;
            }
            for i in 0..batch_of(q) {
                if !same(&other.dims[i].axis, &q.dims[i].axis) {
                    errors.at(
                        other.dims[i].span,
                        format!(
                            "batch dim {i} of `{name}` is `{}` but that of `inputs_q` is `{}`; use \
                             the same name or size",
                            show(&other.dims[i].axis),
                            show(&q.dims[i].axis)
                        ),
                    );
                }
            }
        }
    }
    if let (Some(k), Some(v)) = (&inputs_k, &inputs_v)
        && k.dims.len() == v.dims.len()
    {
        let at = v.dims.len() - 2;
        if !same(&v.dims[at].axis, &k.dims[at].axis) {
            errors.at(
                v.dims[at].span,
                format!(
                    "the length of `inputs_v` is `{}` but that of `inputs_k` is `{}`; keys and \
                     values have one length",
                    show(&v.dims[at].axis),
                    show(&k.dims[at].axis)
                ),
            );
        }
    }

    // Heads and features, as Flax (and grouped-query attention) require.
    let features_q = inputs_q.as_ref().and_then(|q| match &q.dims.last()?.axis {
        Some(Axis::Size(n)) => Some((*n, q.dims.last()?.span)),
        Some(Axis::Named(name)) => Some((table.size_of(name)?, q.dims.last()?.span)),
        None => None,
    });
    let mut qkv = None;
    if let Some((Some(h), heads_span)) = heads {
        let (total, what, span) = match (qkv_features, head_dim) {
            (Some((Some(qkv), span)), Some((Some(d), d_span))) => {
                if qkv != h * d {
                    errors.at(
                        d_span,
                        format!(
                            "`head_dim: {d}` × `heads: {h}` is {}, but `qkv_features` is {qkv}; \
                             write one of them, or make them agree",
                            h * d
                        ),
                    );
                }
                (Some(qkv), "`qkv_features`", span)
            }
            (Some((qkv, span)), _) => (qkv, "`qkv_features`", span),
            (None, Some((d, span))) => (d.map(|d| d * h), "`head_dim` × `heads`", span),
            (None, None) => match features_q {
                Some((e, span)) => (
                    Some(e),
                    "the features of `inputs_q` (Flax's default `qkv_features`)",
                    span,
                ),
                None => (None, "", heads_span),
            },
        };
        if let Some(total) = total {
            if total.is_multiple_of(h) {
                qkv = Some(total);
            } else {
                errors.with_note(
                    span,
                    format!(
                        "{what} = {total} is not divisible by `heads: {h}`: each head gets \
                         `qkv_features / heads` features; heads that divide {total}: {}",
                        divisors(total)
                    ),
                    heads_span,
                    "heads declared here",
                );
            }
        }
        if let Some((Some(k), span)) = kv_heads
            && !h.is_multiple_of(k)
        {
            errors.at(
                span,
                format!(
                    "`kv_heads: {k}` does not divide `heads: {h}`: in grouped-query attention \
                     query head `n` reads key/value head `n / (heads / kv_heads)`; divisors of \
                     {h}: {}",
                    divisors(h)
                ),
            );
        }
    }

    // The mask: `causal(..)` and a mask tensor `[batch.., heads, q_len, kv_len]` (broadcast).
    let mut causal = None;
    let mut mask_tensor = None;
    if let Some(terms) = mask {
        let unsupported = [
            ("window", terms.window.map(|_| ())),
            ("query_lengths", terms.query_lengths.map(|_| ())),
            ("kv_lengths", terms.kv_lengths.map(|_| ())),
            ("segment_ids", terms.segment_ids.map(|_| ())),
        ];
        for (term, present) in unsupported {
            if present.is_some()
                && let Some(entry) = entries.get("mask")
            {
                errors.spanned(
                    &entry.value.tokens,
                    format!(
                        "a projection layer's mask takes `causal` (with an alignment) and a mask \
                         tensor; `{term}` is only supported by attention cores (`query`/`key`)"
                    ),
                );
            }
        }
        causal = terms.causal.map(|(align, _)| align);
        if let (Some(explicit), Some(q)) = (terms.explicit, &inputs_q) {
            let batch = batch_of(q);
            let kv = inputs_k.as_ref().unwrap_or(q);
            let len_at = |s: &ShapeEntry| s.dims[s.dims.len() - 2].axis.clone();
            let mut targets: Vec<(String, Option<Axis>)> = q.dims[..batch]
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("batch dim {i}"), d.axis.clone()))
                .collect();
            targets.push((
                "heads".to_owned(),
                heads.and_then(|(h, _)| h).map(Axis::Size),
            ));
            targets.push(("query length".to_owned(), len_at(q)));
            targets.push(("key length".to_owned(), len_at(kv)));
            let rank = explicit.dims.len();
            if rank > targets.len() {
                errors.at(
                    explicit.shape.span,
                    format!(
                        "the mask has {rank} dims but the logits `[batch.., heads, q_len, \
                         kv_len]` have {}",
                        targets.len()
                    ),
                );
            } else {
                let offset = targets.len() - rank;
                for (dim, (what, target)) in explicit.dims.iter().zip(&targets[offset..]) {
                    let one = matches!(dim.axis, Some(Axis::Size(1)));
                    if !one && !same(&dim.axis, target) {
                        errors.at(
                            dim.span,
                            format!(
                                "mask dim `{}` is neither `1` nor the {what} (`{}`); the mask \
                                 broadcasts to `[batch.., heads, q_len, kv_len]`",
                                show(&dim.axis),
                                show(target)
                            ),
                        );
                    }
                }
            }
            mask_tensor = Some(explicit);
        }
    }

    let failed = errors.len() > before || !syntax.errors.is_empty();
    if failed {
        return None;
    }
    let input = |name: &'static str, shape: ShapeEntry| Input {
        name,
        axes: shape.dims.into_iter().filter_map(|d| d.axis).collect(),
        written: written(&shape.entry.value.tokens),
        line: line_of(shape.entry.key.span()),
        span: shape.entry.key.span(),
    };
    let (features_q, _) = features_q?;
    let heads = heads?.0?;
    let qkv_features = qkv?;
    Some(ProjectionLayer {
        docs: syntax.attrs.clone(),
        vis: syntax.vis.clone(),
        ident: syntax.ident.clone(),
        line: line_of(syntax.struct_token.span),
        dims: table.dims,
        inputs_q: input("inputs_q", inputs_q?),
        inputs_k: inputs_k.map(|k| input("inputs_k", k)),
        inputs_v: inputs_v.map(|v| input("inputs_v", v)),
        heads,
        kv_heads: kv_heads.and_then(|(k, _)| k).unwrap_or(heads),
        grouped: kv_heads.is_some(),
        head_dim: qkv_features / heads,
        qkv_features,
        out_features: out_features.and_then(|(f, _)| f).unwrap_or(features_q),
        use_bias,
        normalize_qk,
        dtype: entries.contains_key("dtype").then_some(options.dtype),
        param_dtype: param_dtype.unwrap_or(DType::F32),
        dropout_rate: options.dropout_rate,
        broadcast_dropout: options.broadcast_dropout,
        precision: entries
            .contains_key("precision")
            .then_some(options.precision),
        force_fp32_for_softmax: options.force_fp32_for_softmax,
        sow: options.sow,
        causal,
        mask: mask_tensor.map(|m| input("mask", m)),
        mask_written: entries
            .get("mask")
            .map_or(String::new(), |entry| written(&entry.value.tokens)),
        cache: cache.map(|(c, _)| c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn projections(tokens: TokenStream) -> (Vec<ProjectionLayer>, Vec<String>) {
        let input = crate::parse(tokens).unwrap();
        let layers: Vec<&LayerSyntax> = input.layers.iter().collect();
        let (layers, error) = validate_projections(&layers, &[]);
        let messages = error
            .map(|e| e.into_iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        (layers, messages)
    }

    #[test]
    fn sizes_follow_flax_defaults_and_declared_options() {
        let (layers, errors) = projections(quote! {
            struct L {
                inputs_q: [B, T, E = 4096],
                heads: 32, kv_heads: 8, head_dim: 128,
                out_features: 1024, use_bias: false, dtype: bf16, cache: 8192,
            }
            struct Defaults { inputs_q: [T, 96], heads: 3 }
        });
        assert!(errors.is_empty(), "{errors:?}");
        let l = &layers[0];
        assert_eq!((l.heads, l.kv_heads, l.head_dim), (32, 8, 128));
        assert_eq!((l.qkv_features, l.out_features), (4096, 1024));
        assert_eq!(l.cache, Some(Cache::Static(8192)));
        assert_eq!((l.use_bias, l.dtype), (false, Some(DType::BF16)));
        let d = &layers[1];
        assert_eq!((d.qkv_features, d.head_dim, d.out_features), (96, 32, 96));
        assert_eq!((d.dtype, d.input_dtype()), (None, DType::F32));
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let (layers, errors) = projections(quote! {
            struct L { inputs_q: [B, T, E = 30], heads: 4, kv_heads: 3, cache: 0, bogus: 1 }
        });
        assert!(layers.is_empty());
        assert_eq!(errors.len(), 5, "{errors:?}"); // divisibility (+ note), kv_heads, cache, option
        assert!(
            errors
                .iter()
                .any(|e| e.contains("not divisible by `heads: 4`"))
        );
    }
}
