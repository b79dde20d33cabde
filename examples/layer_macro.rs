//! Flax's `MultiHeadDotProductAttention` declared in a few lines with `attention!`: the layer
//! of the `dec_f32_prefill` conformance case (32 features, 2 heads, a KV cache of 10 tokens),
//! loaded from its Flax checkpoint, checked against the outputs Flax stored, then a prompt is
//! prefilled and tokens decoded one at a time.
//!
//! ```text
//! cargo run --release --example layer_macro -- [CASE_DIR]
//! ```
//!
//! `CASE_DIR` defaults to `../shared/conformance/mha`.

// The verdict of a case set, shared by the runners below.
#[path = "../tests/support/mha.rs"]
mod mha;
#[path = "../tests/support/tally.rs"]
mod tally;

use attn::{Array, Const, Context, TensorView, attention};

attention! {
    /// A decoder's self-attention: Flax's `MultiHeadDotProductAttention(num_heads=2)` over 32
    /// features, with a KV cache of 10 tokens (Flax's `decode=True`, `max_length` 10).
    pub struct DecoderAttention {
        inputs_q: [B, T, E = 32],
        heads: 2,
        mask: causal,
        cache: 10,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(
        || std::path::PathBuf::from("../shared/conformance/mha"),
        Into::into,
    );
    let case = mha::load(&dir.join("dec_f32_prefill.json"))?;
    let bytes = std::fs::read(dir.join(case.checkpoint_files().0))?;
    let layer = DecoderAttention::from_msgpack(&bytes, "params")?;
    println!(
        "loaded {}: query/kernel {:?}, out/kernel {:?}",
        case.name(),
        DecoderAttention::QUERY_KERNEL,
        DecoderAttention::OUT_KERNEL
    );

    // The case's tokens, step_inputs [steps, B, 1, E]: the first 4 are the prompt.
    let steps = case.input("step_inputs")?.ok_or("no step_inputs")?;
    let (n, batch) = (steps.shape()[0], steps.shape()[1]);
    let e = DecoderAttention::IN_FEATURES.q;
    let f = DecoderAttention::OUT_FEATURES;
    let values = steps.as_slice::<f32>().ok_or("step_inputs are not f32")?;
    let token = |t: usize, b: usize| &values[(t * batch + b) * e..(t * batch + b + 1) * e];
    let prompt_len = 4;
    let prompt: Vec<f32> = (0..batch)
        .flat_map(|b| (0..prompt_len).flat_map(move |t| token(t, b).to_vec()))
        .collect();
    let prompt = TensorView::new(&prompt, (batch, prompt_len, Const::<32>))?;
    let ctx = &mut Context::deterministic();

    // forward over the prompt (causal) equals the prefill's outputs.
    let forward = layer.forward(prompt, ctx)?;

    let mut cache = DecoderAttentionCache::new();
    let prefilled = layer.prefill(&mut cache, prompt, ctx)?;
    let same = forward
        .as_slice()
        .iter()
        .zip(prefilled.as_slice())
        .all(|(a, b)| (a - b).abs() <= 1e-6);
    println!("forward(prompt) == prefill(prompt): {same}");

    // Flax's outputs [steps, B, 1, F]: the prompt's rows, then one decode step per token.
    let mut outputs = vec![0f32; n * batch * f];
    for b in 0..batch {
        for t in 0..prompt_len {
            let row = &prefilled.as_slice()[(b * prompt_len + t) * f..][..f];
            outputs[(t * batch + b) * f..][..f].copy_from_slice(row);
        }
    }
    for t in prompt_len..n {
        let x: Vec<f32> = (0..batch).flat_map(|b| token(t, b).to_vec()).collect();
        let y = layer.decode(
            &mut cache,
            TensorView::new(&x, (batch, Const::<1>, Const::<32>))?,
            ctx,
        )?;
        for b in 0..batch {
            outputs[(t * batch + b) * f..][..f].copy_from_slice(&y.as_slice()[b * f..][..f]);
        }
        println!(
            "decoded token {t}: cache holds {} of {}",
            cache.len(),
            DecoderAttentionCache::CAPACITY
        );
    }
    let check = case.check("step_outputs", &Array::new(outputs, vec![n, batch, 1, f])?);
    println!(
        "step_outputs against Flax: {} (worst |err|/tol = {:.3})",
        if check.passed() { "PASS" } else { "FAIL" },
        check.worst
    );
    if !check.passed() || !same {
        return Err("the layer does not match Flax".into());
    }
    Ok(())
}
