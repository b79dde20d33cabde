//! GPT-2 style causal self-attention declared with `attention!`: 12 heads of depth 64 (GPT-2
//! small), a run-time batch and sequence length, dropout 0.1 while training, and the weights
//! sown for inspection.
//!
//! Run: `cargo run --release --example gpt2`.
//! See what the declaration expands to: `cargo run -p attn-expand -- examples/gpt2.rs`.

use attn::{AttnError, Const, Context, Intermediates, TensorView, attention};

attention! {
    /// Causal self-attention of a GPT-2 small block.
    pub struct Gpt2Attention {
        query: [B, T, H = 12, D = 64],
        key:   [B, T, H, D],
        value: [B, T, H, D],
        mask: causal,
        dropout_rate: 0.1,
        dtype: f32,
        sow: attention_weights,
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

fn main() -> Result<(), AttnError> {
    let (batch, tokens) = (2, 10);
    let shape = (batch, tokens, Const::<12>, Const::<64>);
    let len = batch * tokens * 12 * 64;
    let (q, k, v) = (inputs(len, 1), inputs(len, 2), inputs(len, 3));
    let (query, key, value) = (
        TensorView::new(&q, shape)?,
        TensorView::new(&k, shape)?,
        TensorView::new(&v, shape)?,
    );
    let layer = Gpt2Attention;

    // Inference: `deterministic` turns dropout off, like Flax's `deterministic=True`.
    let output = layer.forward(query, key, value, &mut Context::deterministic())?;
    println!(
        "output shape {:?} (batch, tokens, heads, depth)",
        output.shape()
    );
    // Causal: token 0 sees only itself, so its output equals its value vector in every head.
    let token0 = 12 * 64;
    let same = output.as_slice()[..token0] == v[..token0];
    println!("token 0 attends only to itself: {same}");

    // Training: dropout at the declared rate 0.1, drawn from a seed; the sink receives the
    // weights before dropout, as Flax's `sow` does.
    let mut sown = Intermediates::new();
    let weights = layer.weights(query, key, &mut Context::with_dropout(7).sow(&mut sown))?;
    let kept: Vec<f32> = weights
        .as_slice()
        .iter()
        .copied()
        .filter(|w| *w > 0.0)
        .collect();
    let visible = batch * 12 * tokens * (tokens + 1) / 2;
    println!(
        "training weights: {} of {} visible entries kept after dropout ({:.1}%)",
        kept.len(),
        visible,
        100.0 * kept.len() as f64 / visible as f64
    );
    let before = &sown.attention_weights()[0];
    let row: Vec<f64> = before.to_f64_vec()[tokens * 3..tokens * 4].to_vec();
    println!(
        "sown weights {:?}; head 0, token 3 attends to: {}",
        before.shape(),
        row.iter()
            .map(|w| format!("{w:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("row sum before dropout: {:.6}", row.iter().sum::<f64>());
    Ok(())
}
