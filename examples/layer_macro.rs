//! A projection layer declared with `attention!`: Flax's `MultiHeadDotProductAttention` with
//! its parameters, loaded from a checkpoint of the `mha/` conformance set.

use attn::{Const, Context, TensorView, attention};

attention! {
    /// Causal self-attention of the `f32_mask_causal` case: 16 features, 4 heads of 4.
    pub struct CausalAttention {
        inputs_q: [B, T, E = 16],
        heads: 4,
        mask: causal,
    }

    /// The decoder layer of the `dec_f32_prefill` case, with a KV cache of 10 tokens.
    pub struct DecoderAttention {
        inputs_q: [B, T, E = 32],
        heads: 2,
        cache: 10,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new("../shared/conformance/mha");
    let layer = CausalAttention::from_msgpack(
        &std::fs::read(dir.join("f32_mask_causal.msgpack"))?,
        "params",
    )?;
    let x = vec![0.25f32; 2 * 8 * 16];
    let y = layer.forward(
        TensorView::new(&x, (2, 8, Const::<16>))?,
        &mut Context::deterministic(),
    )?;
    println!("{:?}", y.shape());
    let dec = DecoderAttention::from_msgpack(
        &std::fs::read(dir.join("dec_f32_prefill.msgpack"))?,
        "params",
    )?;
    let mut cache = DecoderAttentionCache::new();
    let p = vec![0.5f32; 2 * 4 * 32];
    let _ = dec.prefill(
        &mut cache,
        TensorView::new(&p, (2, 4, Const::<32>))?,
        &mut Context::deterministic(),
    )?;
    let t = vec![0.5f32; 2 * 32];
    let z = dec.decode(
        &mut cache,
        TensorView::new(&t, (2, Const::<1>, Const::<32>))?,
        &mut Context::deterministic(),
    )?;
    println!("{:?} {}", z.shape(), cache.len());
    Ok(())
}
