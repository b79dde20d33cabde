//! bfloat16 inputs with Flax's `force_fp32_for_softmax`: the softmax runs in float32 and the
//! results come back as float32, instead of a bfloat16 softmax. The example measures how far
//! each variant is from the same computation in float64 on the same (bf16-rounded) inputs.
//!
//! Run: `cargo run --release --example bf16_force_fp32`.

use attn::{AttnError, Const, Context, TensorView, attention};
use half::bf16;

attention! {
    /// bf16 attention with the softmax in bf16 (Flax's default).
    struct Bf16Softmax {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: bf16,
    }

    /// bf16 attention with the softmax forced to float32: weights and output are `f32`.
    struct Fp32Softmax {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: bf16,
        force_fp32_for_softmax: true,
    }

    /// The same layer in float64, as the reference.
    struct Reference {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: f64,
    }
}

fn inputs(len: usize, seed: u64) -> Vec<f64> {
    (0..len as u64)
        .map(|i| {
            let mut x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            (x % 20_000) as f64 / 10_000.0 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: impl Iterator<Item = f64>, b: &[f64]) -> f64 {
    a.zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn main() -> Result<(), AttnError> {
    let (q_len, kv_len) = (8, 24);
    let to_bf16 = |v: Vec<f64>| -> Vec<bf16> { v.into_iter().map(bf16::from_f64).collect() };
    let q = to_bf16(inputs(q_len * 4 * 32, 1));
    let k = to_bf16(inputs(kv_len * 4 * 32, 2));
    let v = to_bf16(inputs(kv_len * 4 * 32, 3));
    let widen = |x: &[bf16]| -> Vec<f64> { x.iter().map(|e| e.to_f64()).collect() };
    let (q64, k64, v64) = (widen(&q), widen(&k), widen(&v));

    let q_shape = (q_len, Const::<4>, Const::<32>);
    let kv_shape = (kv_len, Const::<4>, Const::<32>);
    let ctx = &mut Context::deterministic();
    let (q, k, v) = (
        TensorView::new(&q, q_shape)?,
        TensorView::new(&k, kv_shape)?,
        TensorView::new(&v, kv_shape)?,
    );

    let reference = Reference.forward(
        TensorView::new(&q64, q_shape)?,
        TensorView::new(&k64, kv_shape)?,
        TensorView::new(&v64, kv_shape)?,
        ctx,
    )?;
    let plain = Bf16Softmax.forward(q, k, v, ctx)?;
    // The output type is `Tensor<f32, ..>`: Flax returns float32 here too.
    let forced = Fp32Softmax.forward(q, k, v, ctx)?;
    let plain_error = max_abs_diff(
        plain.as_slice().iter().map(|x| x.to_f64()),
        reference.as_slice(),
    );
    let forced_error = max_abs_diff(
        forced.as_slice().iter().map(|&x| f64::from(x)),
        reference.as_slice(),
    );
    println!("output shape {:?}", forced.shape());
    println!("max |output - float64 reference|:");
    println!("  bf16 softmax (bf16 output):              {plain_error:.5}");
    println!("  force_fp32_for_softmax (float32 output): {forced_error:.5}");
    Ok(())
}
