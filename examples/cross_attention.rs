//! Encoder-decoder cross-attention with a key padding mask: decoder tokens attend to encoder
//! outputs of different lengths, padded to the longest; padded keys get weight 0.
//!
//! Run: `cargo run --release --example cross_attention`.

use attn::{AttnError, Const, Context, TensorView, attention};

attention! {
    /// Decoder queries attend to the encoder's keys and values; `S` (encoder length) and `T`
    /// (decoder length) differ, and `mask` marks the real (non-padding) encoder tokens.
    pub struct CrossAttention {
        query: [B, T, H = 4, D = 16],
        key:   [B, S, H, D],
        value: [B, S, H, D],
        /// `true` for real encoder tokens, `false` for padding.
        mask:  [B, 1, 1, S],
    }
}

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
    let (batch, decoder_len, encoder_len) = (3, 4, 6);
    // Real encoder lengths of the three sequences; the rest is padding.
    let lengths = [6, 4, 2];
    let query = inputs(batch * decoder_len * 4 * 16, 1);
    let key = inputs(batch * encoder_len * 4 * 16, 2);
    let value = inputs(batch * encoder_len * 4 * 16, 3);
    let padding: Vec<bool> = (0..batch * encoder_len)
        .map(|i| i % encoder_len < lengths[i / encoder_len])
        .collect();

    let kv_shape = (batch, encoder_len, Const::<4>, Const::<16>);
    let query = TensorView::new(&query, (batch, decoder_len, Const::<4>, Const::<16>))?;
    let (key, value) = (
        TensorView::new(&key, kv_shape)?,
        TensorView::new(&value, kv_shape)?,
    );
    let mask = TensorView::new(&padding, (batch, Const::<1>, Const::<1>, encoder_len))?;
    let layer = CrossAttention;
    let weights = layer.weights(query, key, mask, &mut Context::deterministic())?;
    let output = layer.forward(query, key, value, mask, &mut Context::deterministic())?;
    println!("weights {:?}", weights.shape());
    println!("output  {:?}", output.shape());
    for (b, &real) in lengths.iter().enumerate() {
        // weights[b, head 0, decoder token 0, :]
        let start = b * 4 * decoder_len * encoder_len;
        let row = &weights.as_slice()[start..start + encoder_len];
        let on_padding = row[real..].iter().fold(0.0, |sum, w| sum + w);
        println!(
            "sequence {b}: {real} real encoder tokens; decoder token 0, head 0 attends {}  \
             (weight on padding: {on_padding})",
            row.iter()
                .map(|w| format!("{w:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
