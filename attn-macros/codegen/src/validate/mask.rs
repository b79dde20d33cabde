//! `mask: term + term + ..`: causal with an alignment, sliding windows, query/kv lengths,
//! segment ids and one mask tensor.

use super::*;
use proc_macro2::Delimiter;
use syn::spanned::Spanned;

/// The terms of a `mask` entry, as read.
#[derive(Default)]
pub(super) struct MaskTerms<'a> {
    pub(super) causal: Option<(ir::Align, Span)>,
    pub(super) window: Option<ir::Window>,
    pub(super) query_lengths: Option<Span>,
    pub(super) kv_lengths: Option<Span>,
    pub(super) segment_ids: Option<Span>,
    pub(super) explicit: Option<ShapeEntry<'a>>,
}

pub(super) const MASK_FORMS: &str = "a mask is `+`-joined terms: `causal`, `causal(bottom_right)`, \
     `causal(offset = N)`, `window(left, right)`, `query_lengths`, `kv_lengths`, `segment_ids` \
     or a shape such as `[B, 1, 1, S]`";

/// The names of a mask's terms, for "did you mean".
pub(super) const MASK_TERMS: &[&str] = &[
    "causal",
    "window",
    "query_lengths",
    "kv_lengths",
    "segment_ids",
];

/// The terms that add inputs to the generated methods (their shapes follow from the layer's).
const INPUT_TERMS: &[&str] = &["query_lengths", "kv_lengths", "segment_ids"];

/// The inputs a term of [`INPUT_TERMS`] adds, with their shapes.
fn input_shapes(name: &Ident) -> String {
    if name == "segment_ids" {
        "it adds the `i32` inputs `query_segment_ids: [batch.., q_len]` and \
         `kv_segment_ids: [batch.., kv_len]`, shaped from `query` and `key`"
            .to_owned()
    } else {
        format!(
            "it adds the `i32` input `{name}: [batch..]` (one length per batch element), shaped \
             from `query`'s batch dims"
        )
    }
}

/// A mask term that is neither a name, a call nor a shape: terms joined by another operator
/// than `+`, a forgotten `+`, arguments in brackets, or anything else.
fn other_term(tokens: &TokenStream, errors: &mut Errors) {
    use proc_macro2::TokenTree;
    let trees: Vec<TokenTree> = tokens.clone().into_iter().collect();
    let is_term = |tree: &TokenTree| {
        matches!(tree, TokenTree::Ident(i) if MASK_TERMS.iter().any(|t| i == t))
            || matches!(tree, TokenTree::Group(g) if g.delimiter() == Delimiter::Bracket)
    };
    let terms = trees.iter().filter(|t| is_term(t)).count();
    // `causal & [B, 1, 1, S]`, `causal | kv_lengths`, `causal && window(8, 0)`
    let operator = trees.iter().enumerate().find_map(|(i, tree)| match tree {
        TokenTree::Punct(p) if i > 0 && "&|*^/".contains(p.as_char()) => Some(p),
        _ => None,
    });
    match (trees.as_slice(), operator) {
        (_, Some(op)) if terms >= 1 => errors.at(
            op.span(),
            format!(
                "mask terms are joined with `+`, not `{}`: a key is visible when every term \
                 allows it; {MASK_FORMS}",
                op.as_char()
            ),
        ),
        ([TokenTree::Ident(name), TokenTree::Group(group), ..], _)
            if group.delimiter() == Delimiter::Bracket && MASK_TERMS.iter().any(|t| name == t) =>
        {
            let message = if INPUT_TERMS.iter().any(|t| name == t) {
                format!("`{name}` takes no shape: {}", input_shapes(name))
            } else {
                format!(
                    "the arguments of `{name}` are written in parentheses, such as \
                     `causal(bottom_right)` or `window(512, 0)`"
                )
            };
            errors.at(group.span(), message)
        }
        _ if terms >= 2 => {
            // The first term's last token, where the `+` belongs after.
            let second = trees
                .iter()
                .skip(1)
                .find(|t| is_term(t))
                .map_or_else(|| tokens.span(), TokenTree::span);
            errors.at(
                second,
                format!("expected `+` before this mask term; {MASK_FORMS}"),
            )
        }
        _ => errors.spanned(tokens, MASK_FORMS),
    }
}

/// `top_left`, `bottom_right`, `offset = N` (inside `causal(..)` or as `window`'s third argument).
pub(super) fn read_align(
    tokens: &TokenStream,
    span: Span,
    errors: &mut Errors,
) -> Option<ir::Align> {
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
pub(super) fn read_side(
    tokens: &TokenStream,
    which: &str,
    span: Span,
    errors: &mut Errors,
) -> Option<usize> {
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
pub(super) fn read_mask<'a>(
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
        // `window(1,, 2)`: the missing argument, at the `,` after it.
        if let Term::Call { name, args, .. } = term
            && (name == "causal" || name == "window")
            && let Some(empty) = args.iter().find(|arg| arg.tokens.is_empty())
        {
            let forms = if name == "causal" {
                "`causal(bottom_right)`"
            } else {
                "`window(left, right)`"
            };
            errors.at(
                empty.span,
                format!("missing an argument of `{name}` before this `,`; write {forms}"),
            );
            ok = false;
            continue;
        }
        match term {
            Term::Ident(ident) if ident == "causal" => {
                if once("causal", ident.span(), errors) {
                    terms.causal = Some((ir::Align::TopLeft, ident.span()));
                } else {
                    ok = false;
                }
            }
            Term::Call { name, span, args } if name == "causal" => {
                let align = match args.as_slice() {
                    [arg] => read_align(&arg.tokens, arg.span, errors),
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
                    }
                    _ => ok = false,
                }
            }
            Term::Call { name, span, args } if name == "window" => {
                let read = match args.as_slice() {
                    [left, right] | [left, right, _] => {
                        let left = read_side(&left.tokens, "left", left.span, errors);
                        let right = read_side(&right.tokens, "right", right.span, errors);
                        let align = match args.get(2) {
                            Some(align) => read_align(&align.tokens, align.span, errors).map(Some),
                            None => Some(None),
                        };
                        match (left, right, align) {
                            (Some(left), Some(right), Some(align)) => Some((left, right, align)),
                            _ => None,
                        }
                    }
                    [one] => {
                        let n = written(&one.tokens);
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
            Term::Call { name, span, .. } if INPUT_TERMS.iter().any(|t| name == t) => {
                errors.at(
                    *span,
                    format!("`{name}` takes no arguments: {}", input_shapes(name)),
                );
                ok = false;
            }
            Term::Other(tokens) => {
                other_term(tokens, errors);
                ok = false;
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
                let hint = hint.map_or(String::new(), |h| {
                    if h.ends_with('?') {
                        format!("{h} ")
                    } else {
                        format!("{h}; ")
                    }
                });
                errors.at(
                    ident.span(),
                    format!("unknown mask `{text}`; {hint}{MASK_FORMS}"),
                );
                ok = false;
            }
            Term::Lit { .. } => {
                errors.spanned(term.to_token_stream(), MASK_FORMS);
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
