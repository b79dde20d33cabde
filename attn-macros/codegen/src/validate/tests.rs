//! Tests of the validator: messages and their order, for each kind of mistake.

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
    assert_messages(&found, &["`value` has heads `H` but `key` has heads `G`"]);
    for source in [
        "struct L { query: [B, T, H = 32, D = 128], key: [B, S, G = 8, D], value: [B, S, G, D] }",
        "struct L { query: [B, T, H, D], key: [B, S, G, D], value: [B, S, G, D] }",
        "struct L { query: [T, H, D], key: [S, 1, D] }",
    ] {
        let found = messages_of(source);
        assert!(found.is_empty(), "{source}: {found:#?}");
    }
}

#[test]
fn mask_structures() {
    let ok = "struct L {
        query: [B, T, H = 32, D = 128],
        key: [B, S, G = 8, D],
        value: [B, S, G, D],
        mask: causal(bottom_right) + window(4096, 0) + query_lengths + kv_lengths + segment_ids + [B, 1, T, S],
    }";
    assert!(messages_of(ok).is_empty(), "{:#?}", messages_of(ok));
    let found = messages_of(
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
    let found = messages_of(
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
    let found = messages_of(
        "struct L { query: [T, H, D], key: [S, H, D], mask: causal(bottom_right) + window(8, 0, top_left) }",
    );
    assert_messages(&found, &["the window's alignment differs from `causal`'s"]);
}

/// Each error's message with the source text it points at.
fn pointed_at(source: &str) -> Vec<(String, String)> {
    let input = parse(source.parse().expect("lexes")).expect("parses");
    match validate(&input) {
        Ok(_) => Vec::new(),
        Err(error) => error
            .into_iter()
            .map(|e| {
                let range = e.span().byte_range();
                (source[range].to_owned(), e.to_string())
            })
            .collect(),
    }
}

#[test]
fn missing_call_arguments_point_at_the_comma() {
    let source = "struct L { query: [T, H, D], key: [S, H, D], mask: window(1,, 2) + causal(,) }";
    let found = pointed_at(source);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0].0, ",");
    assert!(
        found[0]
            .1
            .starts_with("missing an argument of `window` before this `,`")
    );
    assert_eq!(found[1].0, ",");
    assert!(
        found[1]
            .1
            .starts_with("missing an argument of `causal` before this `,`")
    );
    // Byte 60 is the second comma of `window(1,, 2)`.
    let input = parse(source.parse().unwrap()).unwrap();
    let error = validate(&input).err().unwrap();
    assert_eq!(error.span().byte_range(), 60..61);
}

#[test]
fn separators_other_than_commas_and_pluses() {
    let found = pointed_at(
        "struct L {
            query: [B, T, H, D] | key: [B, S, H, D]. value: [B; S; H; D],
            bias: [B | 1 | T | S],
            mask: causal & kv_lengths + causal(bottom_right) window(8, 0),
        }",
    );
    let expected = [
        ("|", "entries are separated by `,`, not `|`"),
        (".", "entries are separated by `,`, not `.`"),
        ("B; S; H; D", "dims are separated by `,`, not `;`"),
        ("B | 1 | T | S", "dims are separated by `,`, not `|`"),
        ("&", "mask terms are joined with `+`, not `&`"),
        ("window", "expected `+` before this mask term"),
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for ((text, message), (at, start)) in found.iter().zip(expected) {
        assert_eq!(text, at, "{message}");
        assert!(message.starts_with(start), "{message:?} vs {start:?}");
    }
    let found = pointed_at("struct L { query: [T, H, D], key: [S, H, D], mask: causal, [T, S] }");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].0, ",");
    assert!(
        found[0]
            .1
            .starts_with("the terms of a mask are joined with `+`, not `,`")
    );
}

#[test]
fn input_terms_take_no_arguments() {
    let found = pointed_at(
        "struct L { query: [B, T, H, D], key: [B, S, H, D], mask: query_lengths(B) + segment_ids[B, T] + causal[bottom_right] }",
    );
    let expected = [
        (
            "(B)",
            "`query_lengths` takes no arguments: it adds the `i32` input `query_lengths: [batch..]`",
        ),
        (
            "[B, T]",
            "`segment_ids` takes no shape: it adds the `i32` inputs `query_segment_ids: [batch.., q_len]`",
        ),
        (
            "[bottom_right]",
            "the arguments of `causal` are written in parentheses",
        ),
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for ((text, message), (at, start)) in found.iter().zip(expected) {
        assert_eq!(text, at, "{message}");
        assert!(message.starts_with(start), "{message:?} vs {start:?}");
    }
}

#[test]
fn shapes_as_tuples() {
    let found = pointed_at("struct L { query: (T, H, D), key: [S, H, D] }");
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0]
            .1
            .ends_with("found a tuple in parentheses (NumPy's and JAX's `.shape`)")
    );
}
