//! Llama-style grouped-query attention declared with `attention!`: 32 query heads reading 8
//! key/value heads (each key/value head serves 4 query heads, with no copy of K/V), a causal
//! mask with a Mistral-style sliding window, the decode step of a KV cache (the causal diagonal
//! aligned bottom-right), and packed sequences separated by segment ids.
//!
//! The prefill output is checked against the Flax-style runtime call (`attn::flax` with
//! `FlaxArgs::causal` and `FlaxArgs::window`) and one of its rows against a plain f64
//! computation written here; the decode step must reproduce the prefill's last row.
//!
//! Run: `cargo run --release --example llama_gqa`.
//! See what the declarations expand to: `cargo run -p attn-expand -- examples/llama_gqa.rs`.

use attn::kernel::{Align, Window};
use attn::{Array, AttnError, Const, Context, FlaxArgs, TensorView, attention};

/// Keys before its own position that a query sees (the window is `WINDOW + 1` keys wide).
const WINDOW: usize = 3;

attention! {
    /// One attention layer of a Llama-style model (prefill): 32 query heads, 8 key/value heads,
    /// causal with a sliding window of 3 keys back.
    pub struct LlamaGqa {
        query: [B, T, H = 32, D = 128],
        key:   [B, T, K = 8, D],
        value: [B, T, K, D],
        mask: causal + window(3, 0),
    }

    /// The same layer decoding with a KV cache: `T` new tokens against `S` cached keys, the last
    /// query at the last key (the causal diagonal aligned bottom-right, as in chunked prefill).
    pub struct LlamaDecode {
        query: [B, T, H = 32, D = 128],
        key:   [B, S, K = 8, D],
        value: [B, S, K, D],
        mask: causal(bottom_right) + window(3, 0),
    }

    /// Several sequences packed into one row: a token attends only within its own segment.
    pub struct PackedGqa {
        query: [B, T, H = 32, D = 128],
        key:   [B, T, K = 8, D],
        value: [B, T, K, D],
        mask: causal + segment_ids,
    }

    /// A padded batch with heads chosen at run time: `G` must divide `H` (checked at entry),
    /// and each sequence's real length is passed as `query_lengths` and `kv_lengths` `[B]`.
    pub struct PaddedBatch {
        query: [B, T, H, D],
        key:   [B, T, G, D],
        value: [B, T, G, D],
        mask: causal + query_lengths + kv_lengths,
    }
}

/// Reproducible inputs in [-1, 1) (a hash of the index; no RNG dependency needed).
fn inputs(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            (x % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

/// Output row `[b, t, h, :]` computed in f64 from the definition: query head `h` reads key/value
/// head `h / (32 / 8)`; keys `t - WINDOW ..= t` are visible; softmax of `q·k / sqrt(128)`.
fn reference_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tokens: usize,
    (b, t, h): (usize, usize, usize),
) -> Vec<f64> {
    let (heads, kv_heads, depth) = (32, 8, 128);
    let g = h / (heads / kv_heads);
    let q_at = |i: usize, d: usize| f64::from(q[((b * tokens + i) * heads + h) * depth + d]);
    let kv_at =
        |x: &[f32], j: usize, d: usize| f64::from(x[((b * tokens + j) * kv_heads + g) * depth + d]);
    let visible: Vec<usize> = (t.saturating_sub(WINDOW)..=t).collect();
    let logits: Vec<f64> = visible
        .iter()
        .map(|&j| {
            (0..depth).map(|d| q_at(t, d) * kv_at(k, j, d)).sum::<f64>() / (depth as f64).sqrt()
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    (0..depth)
        .map(|d| {
            visible
                .iter()
                .zip(&weights)
                .map(|(&j, w)| w / total * kv_at(v, j, d))
                .sum()
        })
        .collect()
}

fn main() -> Result<(), AttnError> {
    let (batch, tokens) = (2, 9);
    let (q_len, kv_len) = (batch * tokens * 32 * 128, batch * tokens * 8 * 128);
    let (q, k, v) = (inputs(q_len, 1), inputs(kv_len, 2), inputs(kv_len, 3));
    let query = TensorView::new(&q, (batch, tokens, Const::<32>, Const::<128>))?;
    let kv_shape = (batch, tokens, Const::<8>, Const::<128>);
    let (key, value) = (
        TensorView::new(&k, kv_shape)?,
        TensorView::new(&v, kv_shape)?,
    );

    // Prefill: every token of both sequences.
    let ctx = &mut Context::deterministic();
    let output = LlamaGqa.forward(query, key, value, ctx)?;
    let weights = LlamaGqa.weights(query, key, ctx)?;
    println!("query {:?}, key/value {:?}", query.shape(), key.shape());
    println!(
        "output  {:?} (batch, tokens, query heads, depth)",
        output.shape()
    );
    println!(
        "weights {:?} (batch, query heads, queries, keys)",
        weights.shape()
    );

    // The same call through the Flax-style runtime API.
    let array =
        |data: &[f32], heads: usize| Array::new(data.to_vec(), vec![batch, tokens, heads, 128]);
    let flax = attn::dot_product_attention(
        &array(&q, 32)?,
        &array(&k, 8)?,
        &array(&v, 8)?,
        FlaxArgs::new()
            .deterministic(true)
            .causal(Align::TopLeft)
            .window(Window {
                left: WINDOW,
                right: 0,
                align: Align::TopLeft,
            }),
    )?;
    let flax = flax.as_slice::<f32>().expect("f32 output");
    let diff = max_abs_diff(output.as_slice(), flax);
    println!("max |macro - flax-style runtime| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "the macro's layer and the Flax-style call disagree: {diff}"
    );

    // One row against the f64 definition: batch 1, token 7, query head 13 (key/value head 3).
    let (b, t, h) = (1, 7, 13);
    let expected = reference_row(&q, &k, &v, tokens, (b, t, h));
    let start = ((b * tokens + t) * 32 + h) * 128;
    let row = &output.as_slice()[start..start + 128];
    let row_diff = row
        .iter()
        .zip(&expected)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max);
    println!("output[{b}, {t}, {h}, :] vs an f64 reference: max |diff| = {row_diff:e}");
    assert!(
        row_diff <= 1e-5,
        "row differs from the f64 reference by {row_diff}"
    );
    // Weights of that row: WINDOW + 1 keys, the rest 0.
    let w_start = ((b * 32 + h) * tokens + t) * tokens;
    let w_row = &weights.as_slice()[w_start..w_start + tokens];
    println!(
        "weights[{b}, {h}, {t}, :] = [{}]",
        w_row
            .iter()
            .map(|w| format!("{w:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Decode: the last token of each sequence against the whole cache (bottom-right alignment
    // puts it at the last key), which must give the prefill's last row.
    let last = |data: &[f32]| -> Vec<f32> {
        (0..batch)
            .flat_map(|b| {
                let row = 32 * 128;
                let start = (b * tokens + tokens - 1) * row;
                data[start..start + row].to_vec()
            })
            .collect()
    };
    let q_last = last(&q);
    let step = TensorView::new(&q_last, (batch, 1, Const::<32>, Const::<128>))?;
    let decoded = LlamaDecode.forward(step, key, value, ctx)?;
    println!(
        "decode step: query {:?} -> output {:?}",
        step.shape(),
        decoded.shape()
    );
    let diff = max_abs_diff(decoded.as_slice(), &last(output.as_slice()));
    println!("max |decode - prefill's last row| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "decoding the last token differs from prefill by {diff}"
    );

    // Packed: each row holds two sequences (4 and 5 tokens); segment ids say which is which.
    let ids: Vec<i32> = (0..batch * tokens)
        .map(|i| i32::from(i % tokens >= 4))
        .collect();
    let segment_ids = TensorView::new(&ids, (batch, tokens))?;
    let packed = PackedGqa.weights(query, key, segment_ids, segment_ids, ctx)?;
    // Token 4 starts the second sequence: it sees only itself.
    let w_start = 4 * tokens;
    println!(
        "packed: segment ids {:?} -> weights {:?}; token 4 (first of segment 1) attends [{}]",
        segment_ids.shape(),
        packed.shape(),
        packed.as_slice()[w_start..w_start + tokens]
            .iter()
            .map(|w| format!("{w:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(packed.as_slice()[w_start + 4], 1.0);

    // Padded: sequence 0 has 9 real tokens, sequence 1 has 6; heads and depth chosen at run
    // time (here the same 32/8/128 as above, as `usize`).
    let lengths = [9, 6];
    let lengths = TensorView::new(&lengths, (batch,))?;
    let dims = |heads: usize| (batch, tokens, heads, 128usize);
    let padded = PaddedBatch.forward(
        TensorView::new(&q, dims(32))?,
        TensorView::new(&k, dims(8))?,
        TensorView::new(&v, dims(8))?,
        lengths,
        lengths,
        ctx,
    )?;
    println!(
        "padded: lengths {:?} -> output {:?}",
        lengths.shape(),
        padded.shape()
    );
    // Token 2 of sequence 0 sees keys 0..=2 in both layers (the window of 3 keys back does not
    // cut them, and all 9 tokens of sequence 0 are real), so the two rows agree.
    let row = |out: &[f32], t: usize| out[t * 32 * 128..(t + 1) * 32 * 128].to_vec();
    let diff = max_abs_diff(&row(padded.as_slice(), 2), &row(output.as_slice(), 2));
    assert!(
        diff <= 1e-6,
        "padded and windowed layers differ where they agree: {diff}"
    );
    // Key/value heads that do not divide the query heads: an error at entry, no panic.
    let error = PaddedBatch
        .weights(
            TensorView::new(&q[..batch * tokens * 30 * 128], dims(30))?,
            TensorView::new(&k, dims(8))?,
            lengths,
            lengths,
            ctx,
        )
        .unwrap_err();
    println!("32 -> 30 query heads with 8 key/value heads: {error}");
    Ok(())
}
