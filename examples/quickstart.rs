//! attn in one page: a GPT-2 small attention layer declared with `attention!` (causal, plus a
//! key-padding mask), run on a batch of 4 sequences of 256 tokens; then the same numbers from
//! the Flax-style dynamic API.
//!
//! Run: `cargo run --release --example quickstart`.

use std::time::Instant;

use attn::{
    Array, AttnError, Const, Context, DType, FlaxArgs, Intermediates, TensorView, attention,
    combine_masks, dot_product_attention, make_causal_mask,
};

attention! {
    /// Causal self-attention of a GPT-2 small block; padding keys are masked out.
    pub struct Gpt2Attention {
        query: [B, T, H = 12, D = 64],
        key:   [B, T, H, D],
        value: [B, T, H, D],
        mask: causal + [B, 1, 1, T],
        dropout_rate: 0.1,
        sow: attention_weights,
    }
}

/// Reproducible inputs in [-1, 1) (a hash of the index, so no RNG crate is needed).
fn inputs(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            (x % 20_000) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

fn main() -> Result<(), AttnError> {
    let (batch, tokens, heads, depth) = (4, 256, 12, 64);
    let shape = (batch, tokens, Const::<12>, Const::<64>);
    let len = batch * tokens * heads * depth;
    let (q, k, v) = (inputs(len, 1), inputs(len, 2), inputs(len, 3));
    // Sequence b has 256 - 40·b real tokens; the rest is padding (mask `false` = do not attend).
    let real = |b: usize| tokens - 40 * b;
    let padding: Vec<bool> = (0..batch * tokens)
        .map(|i| i % tokens < real(i / tokens))
        .collect();
    let (q_view, k_view, v_view) = (
        TensorView::new(&q, shape)?,
        TensorView::new(&k, shape)?,
        TensorView::new(&v, shape)?,
    );
    let mask = TensorView::new(&padding, (batch, Const::<1>, Const::<1>, tokens))?;
    let layer = Gpt2Attention;

    // Inference (`deterministic`: no dropout), with the weights sown into `sown`.
    let mut sown = Intermediates::new();
    let mut ctx = Context::deterministic().sow(&mut sown);
    let output = layer.forward(q_view, k_view, v_view, mask, &mut ctx)?;
    let weights = &sown.attention_weights()[0];
    println!("query   {:?}", q_view.shape());
    println!("mask    {:?} (key padding, and causal)", mask.shape());
    println!("output  {:?}", output.shape());
    println!("weights {:?} (sown)", weights.shape());

    let w = weights.to_f64_vec();
    let row: Vec<String> = w[5 * tokens..][..8]
        .iter()
        .map(|x| format!("{x:.4}"))
        .collect();
    println!(
        "\nbatch 0, head 0, query 5, keys 0..8: [{}]",
        row.join(", ")
    );
    let sums: Vec<f64> = w.chunks(tokens).map(|r| r.iter().sum()).collect();
    let (lo, hi) = sums
        .iter()
        .fold((9.0, 0.0), |(l, h), &s| (s.min(l), s.max(h)));
    println!(
        "row sums of all {} rows: min {lo:.6}, max {hi:.6}",
        sums.len()
    );
    let last_row = &w[((3 * heads + 1) * tokens - 1) * tokens..][..tokens];
    let padded = tokens - real(3);
    let on_padding: f64 = last_row[real(3)..].iter().sum();
    println!("batch 3, last query: weight on its {padded} padding keys = {on_padding}");

    // Timing: the output-only path (no sow sink), median of 7 runs.
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        layer.forward(q_view, k_view, v_view, mask, &mut Context::deterministic())?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (median, flop) = (
        times[3],
        4.0 * (batch * heads * tokens * tokens * depth) as f64,
    );
    println!("\nforward: {:.2} ms (median of 7 runs)", median * 1e3);
    println!(
        "         {:.1} GFLOP/s (4·B·H·T²·D for the two products)",
        flop / median / 1e9
    );

    // The Flax-style API: the same attention as one call, Flax's names and dynamic shapes.
    let array = |data: &[f32]| Array::new(data.to_vec(), [batch, tokens, heads, depth]);
    let (qa, ka, va) = (array(&q)?, array(&k)?, array(&v)?);
    let causal = make_causal_mask(&[batch, tokens], 0, DType::Bool)?;
    let padding = Array::new(padding, [batch, 1, 1, tokens])?;
    let both = combine_masks(&[Some(&causal), Some(&padding)], DType::Bool)?;
    let flax_mask = both.expect("combine_masks of two masks is a mask");
    let args = FlaxArgs::new()
        .mask(&flax_mask)
        .dropout_rate(0.1)
        .deterministic(true);
    let flax_output = dot_product_attention(&qa, &ka, &va, args)?.to_f64_vec();
    let diffs = flax_output
        .iter()
        .zip(output.as_slice())
        .map(|(a, &b)| (a - b as f64).abs());
    println!(
        "\nFlax-style dot_product_attention, max |difference| to the layer: {:e}",
        diffs.fold(0.0, f64::max)
    );
    Ok(())
}
