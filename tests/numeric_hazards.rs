//! Numeric hazards (docs/numerics.md): huge logits, all-`-inf` bias rows, subnormals, fully
//! masked rows, `q_len` / `kv_len` of 0 and 1. Each test states what attn returns and, where
//! that differs from Flax (FLAX_SEMANTICS.md §1 steps 8 and 10), by how much.
//!
//! Expected values are worked out by hand from the softmax definition, not read from attn.

use attn::{
    Array, DType, DropoutRng, FlaxArgs, dot_product_attention, dot_product_attention_weights,
};
use half::f16;

fn arr(dtype: DType, shape: &[usize], data: &[f64]) -> Array {
    Array::from_f64(dtype, data, shape.to_vec()).expect("test array")
}

/// `q [q_len, 1, 1]` and `k [kv, 1, 1]` (depth 1, so the logit is `q_i · k_j` exactly and the
/// scale is 1).
fn depth1(dtype: DType, q: &[f64], k: &[f64]) -> (Array, Array) {
    (
        arr(dtype, &[q.len(), 1, 1], q),
        arr(dtype, &[k.len(), 1, 1], k),
    )
}

fn weights(q: &Array, k: &Array, args: FlaxArgs<'_>) -> Vec<f64> {
    dot_product_attention_weights(q, k, args)
        .expect("weights")
        .to_f64_vec()
}

fn assert_bits(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.is_nan() && w.is_nan()) || g.to_bits() == w.to_bits(),
            "{got:?} vs {want:?}"
        );
    }
}

// ---- logits of ±1e30 ------------------------------------------------------------------------

#[test]
fn logits_of_plus_minus_1e30_give_one_hot_rows() {
    // Logits (1e30, -1e30, 0): exp(-2e30) and exp(-1e30) underflow to exactly 0, so the row is
    // exactly one-hot in f32, bf16 and f64, as in Flax.
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let (q, k) = depth1(dtype, &[1e15, -1e15], &[1e15, -1e15, 0.0]);
        let w = weights(&q, &k, FlaxArgs::new());
        // Row 0: logits (1e30, -1e30, 0) -> key 0; row 1: (-1e30, 1e30, -0) -> key 1.
        assert_bits(&w, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }
}

#[test]
fn equal_huge_logits_are_uniform() {
    // x - max is exactly 0 for every entry: uniform, no overflow.
    let (q, k) = depth1(DType::F32, &[1e15], &[1e15, 1e15, 1e15, 1e15]);
    assert_bits(&weights(&q, &k, FlaxArgs::new()), &[0.25; 4]);
}

#[test]
fn a_bias_of_1e30_dominates_and_one_of_minus_1e30_vanishes() {
    let (q, k) = depth1(DType::F32, &[0.5], &[1.0, 2.0, 3.0]);
    let bias = arr(DType::F32, &[1, 1, 3], &[-1e30, 0.0, 1e30]);
    assert_bits(
        &weights(&q, &k, FlaxArgs::new().bias(&bias)),
        &[0.0, 0.0, 1.0],
    );
    let bias = arr(DType::F32, &[1, 1, 3], &[-1e30, 0.0, 0.0]);
    let w = weights(&q, &k, FlaxArgs::new().bias(&bias));
    // The remaining two keys share the weight: logits 1.0 and 1.5.
    let e = (-0.5f64).exp();
    assert_eq!(w[0], 0.0);
    assert!((w[1] - e / (1.0 + e)).abs() < 1e-7 && (w[2] - 1.0 / (1.0 + e)).abs() < 1e-7);
}

#[test]
fn logits_that_overflow_the_dtype_become_inf_and_the_row_nan() {
    // f32: 1e20 · 1e20 = 1e40 > f32::MAX -> +inf; inf - inf = NaN; Flax gives the same NaN row.
    let (q, k) = depth1(DType::F32, &[1e20, 1.0], &[1e20, 1.0]);
    let w = weights(&q, &k, FlaxArgs::new());
    assert!(w[..2].iter().all(|x| x.is_nan()), "{w:?}");
    // Row 1 (logits 1e20, 1) is unaffected: one-hot.
    assert_bits(&w[2..], &[1.0, 0.0]);
    // f16: 1e30 is not even an f16 (+inf); 300 · 300 = 90000 > 65504 overflows the logit.
    let (q, k) = depth1(DType::F16, &[300.0], &[300.0, 1.0]);
    assert!(weights(&q, &k, FlaxArgs::new()).iter().all(|x| x.is_nan()));
}

#[test]
fn huge_negative_unmasked_logits_lose_to_masked_entries() {
    // A masked entry holds finfo(dtype).min = -3.4028235e38; an unmasked logit below it (here
    // -inf from a bias) loses to it, so the weight goes to the masked entry, as in Flax.
    let (q, k) = depth1(DType::F32, &[1.0], &[1.0, 1.0]);
    let bias = arr(DType::F32, &[1, 1, 2], &[f64::NEG_INFINITY, 0.0]);
    let mask = Array::new(vec![true, false], [1, 1, 2]).unwrap();
    let w = weights(&q, &k, FlaxArgs::new().bias(&bias).mask(&mask));
    assert_bits(&w, &[0.0, 1.0]);
    // f16 computation with an f32 bias: big_neg is f16's -65504, so a bias of -1e5 on the only
    // unmasked key puts the weight on the masked key.
    let (q, k) = depth1(DType::F16, &[1.0], &[1.0, 1.0]);
    let bias = arr(DType::F32, &[1, 1, 2], &[-1e5, 0.0]);
    let w = weights(&q, &k, FlaxArgs::new().bias(&bias).mask(&mask));
    assert_bits(&w, &[0.0, 1.0]);
}

// ---- all-(-inf) bias rows -------------------------------------------------------------------

#[test]
fn an_all_minus_inf_bias_row_is_nan_as_in_flax() {
    // max = -inf, x - max = -inf - (-inf) = NaN: the row is NaN; the other row is unaffected.
    let (q, k) = depth1(DType::F32, &[1.0, 1.0], &[0.0, 0.0, 0.0]);
    let inf = f64::NEG_INFINITY;
    let bias = arr(DType::F32, &[1, 2, 3], &[inf, inf, inf, 0.0, 0.0, 0.0]);
    let w = weights(&q, &k, FlaxArgs::new().bias(&bias));
    assert!(w[..3].iter().all(|x| x.is_nan()), "{w:?}");
    let third = (1.0f32 / 3.0) as f64;
    assert_bits(&w[3..], &[third, third, third]);
    // The output row of a NaN weight row is NaN too.
    let v = arr(DType::F32, &[3, 1, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = dot_product_attention(&q, &k, &v, FlaxArgs::new().bias(&bias))
        .unwrap()
        .to_f64_vec();
    assert!(out[..2].iter().all(|x| x.is_nan()) && out[2..].iter().all(|x| x.is_finite()));
}

#[test]
fn minus_inf_bias_on_unmasked_entries_moves_the_weight_to_masked_ones() {
    // FLAX_SEMANTICS.md §1 step 8: a row whose unmasked entries are all -inf while some entries
    // are masked puts the weight uniformly on the masked entries.
    let (q, k) = depth1(DType::F32, &[1.0], &[1.0, 2.0, 3.0, 4.0]);
    let inf = f64::NEG_INFINITY;
    let bias = arr(DType::F32, &[1, 1, 4], &[inf, inf, 0.0, 0.0]);
    let mask = Array::new(vec![true, true, false, false], [1, 1, 4]).unwrap();
    let w = weights(&q, &k, FlaxArgs::new().bias(&bias).mask(&mask));
    assert_bits(&w, &[0.0, 0.0, 0.5, 0.5]);
}

// ---- subnormals -----------------------------------------------------------------------------

#[test]
fn subnormal_exp_results_are_flushed_to_zero_as_xla_does() {
    // Logits (0, -88): exp(-88) = 6.05e-39 would be an f32 subnormal; XLA:CPU flushes it to 0
    // (FLAX_SEMANTICS.md §1 step 8) and so does attn's f32 exp. bf16 shares f32's exponent
    // range and its math runs in f32: the same 0.
    for dtype in [DType::F32, DType::BF16] {
        let (q, k) = depth1(dtype, &[1.0], &[0.0, -88.0]);
        assert_bits(&weights(&q, &k, FlaxArgs::new()), &[1.0, 0.0]);
    }
}

#[test]
fn a_subnormal_from_the_final_division_is_kept_where_xla_flushes_it() {
    // Logits (0, 0, -87): exp(-87) = 1.65e-38 is a normal f32, but divided by the sum 2 it is
    // 8.2e-39, a subnormal: attn keeps it (IEEE gradual underflow), XLA flushes it to 0. The
    // difference is below f32::MIN_POSITIVE = 1.18e-38.
    let (q, k) = depth1(DType::F32, &[1.0], &[0.0, 0.0, -87.0]);
    let w = weights(&q, &k, FlaxArgs::new());
    let flax = [0.5, 0.5, 0.0];
    for (a, f) in w.iter().zip(flax) {
        assert!((a - f).abs() < f32::MIN_POSITIVE as f64, "{w:?}");
    }
    assert!(w[2] > 0.0 && w[2] < f32::MIN_POSITIVE as f64, "{w:?}");
}

#[test]
fn f16_subnormal_weights_survive_as_in_flax() {
    // Logits (0, -10): exp(-10) = 4.54e-5 is an f16 subnormal (< 6.1e-5); Flax keeps f16
    // subnormals (its f16 math runs in f32 and is then converted), and so does attn.
    let (q, k) = depth1(DType::F16, &[1.0], &[0.0, -10.0]);
    let w = weights(&q, &k, FlaxArgs::new());
    let want = f16::from_f32((-10.0f32).exp());
    assert!(want > f16::ZERO && !want.is_normal());
    assert_eq!(w[1], want.to_f64());
    assert_eq!(w[0], 1.0);
}

#[test]
fn subnormal_inputs_give_zero_logits_and_uniform_rows() {
    // 1e-40 · 1e-40 underflows to 0 in every float dtype: all logits are 0, the row is uniform.
    let (q, k) = depth1(DType::F32, &[1e-40], &[1e-40, -1e-40]);
    assert_bits(&weights(&q, &k, FlaxArgs::new()), &[0.5, 0.5]);
    // A subnormal bias does not change a weight in f32.
    let bias = arr(DType::F32, &[1, 1, 2], &[1e-45, 0.0]);
    assert_bits(&weights(&q, &k, FlaxArgs::new().bias(&bias)), &[0.5, 0.5]);
}

// ---- fully masked rows ----------------------------------------------------------------------

#[test]
fn fully_masked_rows_are_uniform_and_output_the_mean_value() {
    // Every entry holds big_neg, x - max = 0: weights 1/kv (Flax: the same, no NaN).
    let (q, k) = depth1(DType::F32, &[1.0, 2.0], &[1.0, -3.0, 7.0, 0.5, 2.0, 1.0]);
    let mask = Array::new(vec![false; 6], [1, 1, 6]).unwrap();
    let w = weights(&q, &k, FlaxArgs::new().mask(&mask));
    assert_bits(&w, &[(1.0f32 / 6.0) as f64; 12]);
    let v = arr(DType::F32, &[6, 1, 1], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = dot_product_attention(&q, &k, &v, FlaxArgs::new().mask(&mask))
        .unwrap()
        .to_f64_vec();
    for x in out {
        assert!((x - 3.5).abs() < 1e-6, "mean of the values: {x}");
    }
    // f16: 1/6 rounded to f16 is 0.1666259765625, printed 0.16662598 (FLAX_SEMANTICS.md §1 step 8).
    let (q, k) = depth1(DType::F16, &[1.0], &[1.0, -3.0, 7.0, 0.5, 2.0, 1.0]);
    let mask = Array::new(vec![false; 6], [1, 1, 6]).unwrap();
    assert_bits(
        &weights(&q, &k, FlaxArgs::new().mask(&mask)),
        &[0.1666259765625; 6],
    );
}

#[test]
fn a_fully_masked_row_stays_uniform_whatever_the_logits() {
    // Masked entries are replaced, not added to: NaN and inf logits under a full mask vanish.
    let (q, k) = depth1(DType::F32, &[f64::NAN], &[1.0, f64::INFINITY]);
    let mask = Array::new(vec![false, false], [1, 1, 2]).unwrap();
    assert_bits(&weights(&q, &k, FlaxArgs::new().mask(&mask)), &[0.5, 0.5]);
}

// ---- q_len and kv_len of 0 and 1 ------------------------------------------------------------

#[test]
fn q_len_0_gives_empty_results() {
    let q = arr(DType::F32, &[2, 0, 3, 4], &[]);
    let k = arr(DType::F32, &[2, 5, 3, 4], &vec![0.5; 120]);
    let v = arr(DType::F32, &[2, 5, 3, 2], &vec![0.5; 60]);
    let w = dot_product_attention_weights(&q, &k, FlaxArgs::new()).unwrap();
    assert_eq!(w.shape(), &[2, 3, 0, 5]);
    let out = dot_product_attention(&q, &k, &v, FlaxArgs::new()).unwrap();
    assert_eq!(out.shape(), &[2, 0, 3, 2]);
}

#[test]
fn kv_len_0_gives_empty_weights_and_a_zero_output() {
    // Flax 0.12.8 (checked by the runtime): the softmax over an empty axis is empty, and the
    // output is an empty sum over the keys: zeros.
    let q = arr(DType::F32, &[3, 1, 4], &[0.5; 12]);
    let k = arr(DType::F32, &[0, 1, 4], &[]);
    let v = arr(DType::F32, &[0, 1, 2], &[]);
    let w = dot_product_attention_weights(&q, &k, FlaxArgs::new()).unwrap();
    assert_eq!(w.shape(), &[1, 3, 0]);
    let out = dot_product_attention(&q, &k, &v, FlaxArgs::new()).unwrap();
    assert_eq!(out.shape(), &[3, 1, 2]);
    assert_bits(&out.to_f64_vec(), &[0.0; 6]);
}

#[test]
fn q_len_1_is_one_row() {
    let (q, k) = depth1(DType::F64, &[2.0], &[0.0, 1.0]);
    let w = weights(&q, &k, FlaxArgs::new());
    let e = (-2.0f64).exp();
    assert!((w[0] - e / (1.0 + e)).abs() < 1e-15 && (w[1] - 1.0 / (1.0 + e)).abs() < 1e-15);
}

#[test]
fn kv_len_1_weights_are_exactly_one_and_the_output_is_the_value() {
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let (q, k) = depth1(dtype, &[-3.0, 0.0, 5.0], &[7.0]);
        // Any finite bias, and even a full mask, leaves exp(0) / 1 = 1.
        let bias = arr(DType::F32, &[1, 3, 1], &[1e30, -1e30, 0.25]);
        assert_bits(&weights(&q, &k, FlaxArgs::new().bias(&bias)), &[1.0; 3]);
        let mask = Array::new(vec![false, true, false], [1, 3, 1]).unwrap();
        assert_bits(&weights(&q, &k, FlaxArgs::new().mask(&mask)), &[1.0; 3]);
        let v = arr(dtype, &[1, 1, 2], &[0.75, -2.5]);
        let out = dot_product_attention(&q, &k, &v, FlaxArgs::new()).unwrap();
        assert_bits(&out.to_f64_vec(), &[0.75, -2.5, 0.75, -2.5, 0.75, -2.5]);
    }
    // A -inf bias on the only key: -inf - (-inf) = NaN, as in Flax.
    let (q, k) = depth1(DType::F32, &[1.0], &[1.0]);
    let bias = arr(DType::F32, &[1, 1, 1], &[f64::NEG_INFINITY]);
    assert!(weights(&q, &k, FlaxArgs::new().bias(&bias))[0].is_nan());
}

// ---- dropout rate 1 -------------------------------------------------------------------------

#[test]
fn dropout_rate_1_gives_zeros_where_flax_gives_nan() {
    // Flax: keep_prob = 0, multiplier = 0 / 0 = NaN, every weight NaN. attn: nothing is kept
    // and kept weights would be scaled by 0: zeros (a NaN is never a useful training signal).
    let (q, k) = depth1(DType::F32, &[1.0, 2.0], &[1.0, 2.0, 3.0]);
    let args = FlaxArgs::new()
        .dropout_rate(1.0)
        .dropout_rng(DropoutRng::new(3));
    assert_bits(&weights(&q, &k, args), &[0.0; 6]);
}

#[test]
fn f64_with_forced_fp32_softmax_turns_fully_masked_rows_into_nan_as_flax_does() {
    // Masked entries get finfo(float64).min = -1.8e308; force_fp32_for_softmax casts the logits
    // to float32, where that is -inf: a fully masked row is -inf - (-inf) = NaN (Flax: the
    // same); a partially masked row is fine (exp(-inf) = 0).
    let (q, k) = depth1(DType::F64, &[1.0, 2.0], &[1.0, 2.0]);
    let mask = Array::new(vec![false, false, true, false], [1, 2, 2]).unwrap();
    let w = dot_product_attention_weights(
        &q,
        &k,
        FlaxArgs::new().mask(&mask).force_fp32_for_softmax(true),
    )
    .unwrap();
    assert_eq!(w.dtype(), DType::F32);
    let w = w.to_f64_vec();
    assert!(w[0].is_nan() && w[1].is_nan(), "{w:?}");
    assert_bits(&w[2..], &[1.0, 0.0]);
    // Without the forced softmax the fully masked f64 row is uniform.
    let w = weights(&q, &k, FlaxArgs::new().mask(&mask));
    assert_bits(&w, &[0.5, 0.5, 1.0, 0.0]);
}
