//! A fast, branch-free `exp` for `f32` that compilers vectorize.
//!
//! Softmax spends most of its non-GEMM time in `exp`, and `f32::exp` is a scalar libm call that
//! blocks vectorization. [`exp_f32`] is Cephes' `expf` algorithm (the one in `avx_mathfun`):
//! range reduction `x = n·ln2 + r` with `|r| ≤ ln2/2` (Cody–Waite split of `ln2`), a degree-7
//! polynomial for `exp(r)`, and `2ⁿ` applied by adding `n` to the exponent bits. Every step is a
//! select or arithmetic, so a loop over a slice compiles to SIMD code.
//!
//! Accuracy (checked by the tests below against `f64::exp` over every `f32` in
//! `[-87.3, 88.7]` sampled densely): at most 2 ulp relative error, in line with XLA's own
//! `exp`, which the conformance tolerances were calibrated against.
//!
//! Special values follow Flax/XLA on the CPU: `exp(NaN) = NaN`, `exp(-inf) = 0`,
//! `exp(x) = +inf` above `ln(f32::MAX)`, and results that would be subnormal (`x` below
//! `ln(f32::MIN_POSITIVE)`) are flushed to `0`, as XLA does.

/// How the polynomial's multiply–adds are evaluated.
///
/// `f32::mul_add` is one instruction where the FMA feature is enabled (the SIMD variants of the
/// kernels compile with it) but a slow library call elsewhere, so the portable variant uses a
/// separate multiply and add. Both stay within the accuracy stated in the module docs.
pub(crate) trait MulAdd {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Fused multiply–add (one rounding); use only where the `fma` target feature is enabled.
pub(crate) struct Fused;

/// Separate multiply and add (two roundings); fast everywhere.
pub(crate) struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Above this `exp` overflows to `+inf` (`ln(f32::MAX)` rounded down to an `f32`).
const OVERFLOW_AT: f32 = 88.722_83;
/// Below this the result would be subnormal and is flushed to zero (`ln(f32::MIN_POSITIVE)`).
const FLUSH_BELOW: f32 = -87.336_54;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`; `LN2_HI` has few mantissa bits so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting `1.5 · 2²³` rounds an `f32` of magnitude below 2²² to the nearest
/// integer (ties to even) without a call to `round`.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `eˣ` for one `f32`; see the module docs for accuracy and special values.
#[inline(always)]
pub(crate) fn exp_f32<M: MulAdd>(x: f32) -> f32 {
    // Clamp into the range where the reduction below is exact (NaN stays NaN).
    let clamped = x.clamp(FLUSH_BELOW, OVERFLOW_AT);
    // `shifted`'s low mantissa bits hold `n` (offset by the magic number's bits), which gives
    // the integer without a float-to-int conversion (Rust's saturating `as` does not vectorize).
    let shifted = clamped * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, clamped));
    let mut p = 1.987_569_2e-4;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 0.5);
    let poly = M::mul_add(p, r * r, r) + 1.0;
    // `n` is an integer in [-126, 128] here, and `poly` in [0.7, 1.42], so adding `n` to the
    // exponent field stays within the normal range.
    let scaled = f32::from_bits(poly.to_bits().wrapping_add(n_bits << 23));
    if x > OVERFLOW_AT {
        f32::INFINITY
    } else if x < FLUSH_BELOW {
        0.0
    } else {
        scaled
    }
}

/// Replaces every `x` in `values` by `eˣ` ([`exp_f32`]); the loop vectorizes.
#[cfg(test)]
#[inline(always)]
pub(crate) fn exp_in_place<M: MulAdd>(values: &mut [f32]) {
    for v in values {
        *v = exp_f32::<M>(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of `exact` (an f64 close to an f32 value).
    fn ulps(approx: f32, exact: f64) -> f64 {
        let exact32 = exact as f32;
        let ulp = (f32::from_bits(exact32.to_bits() + 1) - exact32) as f64;
        (approx as f64 - exact).abs() / ulp
    }

    /// Largest error over every 61st `f32` bit pattern in `[FLUSH_BELOW, OVERFLOW_AT]` (about
    /// 35 million inputs, both signs), as (ulps, input).
    fn worst_ulps<M: MulAdd>() -> (f64, f32) {
        let negative = (0x8000_0000..=FLUSH_BELOW.to_bits()).step_by(61);
        let positive = (0..=OVERFLOW_AT.to_bits()).step_by(61);
        let inputs: Vec<f32> = negative.chain(positive).map(f32::from_bits).collect();
        let mut outputs = inputs.clone();
        exp_in_place::<M>(&mut outputs);
        let mut worst = (0.0, 0.0);
        for (&input, &out) in inputs.iter().zip(&outputs) {
            let exact = (input as f64).exp();
            if exact < f32::MIN_POSITIVE as f64 || exact > f32::MAX as f64 {
                continue;
            }
            let e = ulps(out, exact);
            if e > worst.0 {
                worst = (e, input);
            }
        }
        worst
    }

    #[test]
    fn fused_exp_is_within_two_ulp_over_the_normal_range() {
        let (err, at) = worst_ulps::<Fused>();
        assert!(err <= 2.0, "max error {err} ulp at x = {at}");
    }

    #[test]
    fn unfused_exp_is_within_two_ulp_over_the_normal_range() {
        let (err, at) = worst_ulps::<Unfused>();
        assert!(err <= 2.0, "max error {err} ulp at x = {at}");
    }

    #[test]
    fn special_values_match_xla() {
        for f in [exp_f32::<Fused>, exp_f32::<Unfused>] {
            assert!(f(f32::NAN).is_nan());
            assert_eq!(f(f32::NEG_INFINITY), 0.0);
            assert_eq!(f(f32::INFINITY), f32::INFINITY);
            assert_eq!(f(89.0), f32::INFINITY);
            assert!(f(88.7).is_finite());
            assert_eq!(f(0.0), 1.0);
            assert_eq!(f(-87.5), 0.0, "subnormal results are flushed like XLA");
            assert_eq!(f(-1.0e30), 0.0);
            assert!(f(FLUSH_BELOW) >= f32::MIN_POSITIVE);
        }
    }

    #[test]
    fn exact_at_small_integers() {
        for k in -20..=20 {
            let exact = (k as f64).exp();
            assert!(ulps(exp_f32::<Fused>(k as f32), exact) <= 1.0, "k = {k}");
        }
    }
}
