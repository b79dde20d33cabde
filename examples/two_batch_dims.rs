//! A layer with two batch dims, `[Beam, B, T, H, D]` (e.g. beams of a beam search over a batch),
//! and a bias that is shared by the beams: `[B, 1, T, S]` broadcasts over `Beam` and the heads.
//!
//! Run: `cargo run --release --example two_batch_dims`.

use attn::{AttnError, Const, Context, TensorView, attention};

attention! {
    /// Attention over two batch dims with a per-sequence bias shared by all beams.
    struct BeamAttention {
        query: [Beam, B, T, H = 2, D = 8],
        key:   [Beam, B, S, H, D],
        value: [Beam, B, S, H, Dv = 4],
        bias:  [B, 1, T, S],
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
    let (beams, batch, q_len, kv_len) = (3, 2, 4, 5);
    let q = inputs(beams * batch * q_len * 2 * 8, 1);
    let k = inputs(beams * batch * kv_len * 2 * 8, 2);
    let v = inputs(beams * batch * kv_len * 2 * 4, 3);
    // Sequence 1 strongly prefers its last key, sequence 0 has no preference.
    let bias: Vec<f32> = (0..batch * q_len * kv_len)
        .map(|i| {
            if i / (q_len * kv_len) == 1 && i % kv_len == kv_len - 1 {
                4.0
            } else {
                0.0
            }
        })
        .collect();

    let q = TensorView::new(&q, (beams, batch, q_len, Const::<2>, Const::<8>))?;
    let k = TensorView::new(&k, (beams, batch, kv_len, Const::<2>, Const::<8>))?;
    let v = TensorView::new(&v, (beams, batch, kv_len, Const::<2>, Const::<4>))?;
    let bias = TensorView::new(&bias, (batch, Const::<1>, q_len, kv_len))?;
    let output = BeamAttention.forward(q, k, v, bias, &mut Context::deterministic())?;
    println!(
        "output {:?} = (beams, batch, q_len, heads, v_depth)",
        output.shape()
    );
    let weights = BeamAttention.weights(q, k, bias, &mut Context::deterministic())?;
    for beam in 0..beams {
        for b in 0..batch {
            // weights[beam, b, head 0, query 0, last key]
            let index = (((beam * batch + b) * 2) * q_len) * kv_len + kv_len - 1;
            println!(
                "beam {beam}, sequence {b}: weight of the last key for query 0 = {:.3}",
                weights.as_slice()[index]
            );
        }
    }
    Ok(())
}
