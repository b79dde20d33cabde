//! Tensors written in another framework's layout (PyTorch's `[batch, heads, len, depth]`, the
//! time-major `[len, batch, heads, depth]`), reported once instead of the mismatches they cause.

use super::*;

/// Names people give the heads; one in the length position means another framework's layout.
pub(super) const HEADS_NAMES: &[&str] = &[
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
pub(super) const LENGTH_NAMES: &[&str] = &[
    "T", "S", "L", "seq", "Seq", "SEQ", "seq_len", "SeqLen", "len", "Len", "LEN", "length",
    "q_len", "kv_len", "tokens", "time", "Tq", "Tk", "Lq", "Lk", "Sq", "Sk",
];

/// Names people give the batch.
pub(super) const BATCH_NAMES: &[&str] =
    &["B", "batch", "Batch", "BATCH", "bs", "bsz", "batch_size"];

pub(super) fn dim_text(dim: &DimSyntax) -> String {
    match dim {
        DimSyntax::Named(name) => name.to_string(),
        DimSyntax::Bound { name, size } => format!("{name} = {}", written(&size.to_token_stream())),
        DimSyntax::Size(lit) => lit.to_string(),
        DimSyntax::Malformed(tokens, _) => written(tokens),
    }
}

/// Tokens whose span runs from `start` to `end` (for an error covering several dims).
pub(super) fn span_range(start: Span, end: Span) -> TokenStream {
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
pub(super) fn check_layouts(
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
            let logits = broadcast
                .iter()
                .filter(|s| {
                    s.dims.len() >= 3
                        && s.dims.len() <= logits_rank
                        && name_at(s, s.dims.len() - 3).as_ref() == Some(len)
                })
                .map(|s| s.entry.key.to_string());
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
