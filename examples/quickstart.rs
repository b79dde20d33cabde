//! attn in a few lines: causal self-attention of a GPT-2-sized block through the Flax-style API,
//! with the attention weights sown for inspection.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::Instant;

use attn::{Array, DType, FlaxArgs, Intermediates, dot_product_attention, make_causal_mask};

fn main() -> Result<(), attn::AttnError> {
    let (batch, len, heads, depth) = (2, 128, 12, 64);
    // Deterministic pseudo-random inputs of shape [batch, len, heads, depth].
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut tensor = |shape: [usize; 4]| {
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Array::new(values, shape)
    };
    let query = tensor([batch, len, heads, depth])?;
    let key = tensor([batch, len, heads, depth])?;
    let value = tensor([batch, len, heads, depth])?;
    // Flax: make_causal_mask(x) for x of shape [batch, len] -> [batch, 1, len, len].
    let mask = make_causal_mask(&[batch, len], 0, DType::Bool)?;

    let mut sown = Intermediates::new();
    let start = Instant::now();
    let output = dot_product_attention(
        &query,
        &key,
        &value,
        FlaxArgs::new().mask(&mask).module(&mut sown),
    )?;
    let elapsed = start.elapsed();

    let weights = &sown.attention_weights()[0];
    println!("query  {:?} {}", query.shape(), query.dtype());
    println!("mask   {:?} {} (causal)", mask.shape(), mask.dtype());
    println!("output {:?} {}", output.shape(), output.dtype());
    println!("weights (sown) {:?} {}", weights.shape(), weights.dtype());
    let w = weights.to_f64_vec();
    for position in [0, 1, 3] {
        let row = &w[position * len..position * len + 6];
        let shown: Vec<String> = row.iter().map(|x| format!("{x:.4}")).collect();
        println!(
            "  batch 0, head 0, query {position}: keys 0..6 = [{}]",
            shown.join(", ")
        );
    }
    let flops = 4.0 * (batch * heads * len * len * depth) as f64;
    println!(
        "time: {:.2} ms ({:.2} GFLOP/s for the two matrix products)",
        elapsed.as_secs_f64() * 1e3,
        flops / elapsed.as_secs_f64() / 1e9
    );
    Ok(())
}
