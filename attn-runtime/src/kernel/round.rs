//! Rounding `f32` values to bf16 or f16 precision without leaving `f32`, by integer operations
//! on the bits: branch-free, so loops over slices vectorize. This is how the kernels emulate
//! Flax's 16-bit rounding points (the values stay `f32`, as XLA's CPU code computes 16-bit
//! elementwise math in f32 and rounds after each step).

use crate::element::DType;

/// A rounding of `f32` values to a float format no wider than `f32`.
pub(crate) trait Narrow {
    /// `x` rounded to the nearest value of the format (ties to even), as an `f32`; NaN stays
    /// NaN, values beyond the format's range become infinities.
    fn round(x: f32) -> f32;

    /// The `bf16` bits of `round(x)` ([`bf16_bits`]: rounded again, to bf16).
    #[inline(always)]
    fn bf16_bits_of_round(x: f32) -> u16 {
        bf16_bits(Self::round(x))
    }
}

/// No rounding (the format is `f32` itself).
pub(crate) struct KeepF32;

/// Rounding to bfloat16 (8 exponent bits, 7 stored mantissa bits).
pub(crate) struct ToBf16;

/// Rounding to IEEE half precision (5 exponent bits, 10 stored mantissa bits, subnormals).
pub(crate) struct ToF16;

/// The `bf16` bits of `x`, rounded to nearest even ([`ToBf16`]); NaN stays NaN (its quiet
/// bit is set, so that a payload in the dropped bits alone cannot turn it into infinity), as
/// `half`'s `bf16::from_f32` does, but branch-free, so that loops over slices vectorize.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = (ToBf16::round(x).to_bits() >> 16) as u16;
    if x.is_nan() { bits | 0x40 } else { bits }
}

impl Narrow for KeepF32 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }

    #[inline(always)]
    fn bf16_bits_of_round(x: f32) -> u16 {
        bf16_bits(x)
    }
}

impl Narrow for ToBf16 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        // bf16 is the top half of an f32: add just under half of the dropped part (plus the
        // kept part's lowest bit, for ties to even) and clear the dropped bits. A carry into
        // the exponent is the correct rounding up, and to infinity beyond bf16's range.
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
        if x.is_nan() {
            x
        } else {
            f32::from_bits(rounded)
        }
    }

    #[inline(always)]
    fn bf16_bits_of_round(x: f32) -> u16 {
        // Rounding to bf16 twice is rounding once.
        bf16_bits(x)
    }
}

/// Smallest normal f16, `2⁻¹⁴`.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
/// Values of at least this magnitude round to infinity in f16 (`65504 + ulp/2`).
const F16_OVERFLOW: f32 = 65_520.0;
/// `0.75` has an ulp of `2⁻²⁴`, f16's subnormal spacing: `(x + 0.75) - 0.75` rounds a
/// magnitude below `2⁻¹⁴` to a multiple of `2⁻²⁴`, ties to even.
const F16_SUBNORMAL_MAGIC: f32 = 0.75;

impl Narrow for ToF16 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        let magnitude = x.abs();
        // Normal range: keep 10 of the 23 mantissa bits (as for bf16 above, 13 bits dropped).
        let bits = x.to_bits();
        let normal = f32::from_bits(bits.wrapping_add(0x0fff + ((bits >> 13) & 1)) & 0xffff_e000);
        let subnormal = ((x + F16_SUBNORMAL_MAGIC) - F16_SUBNORMAL_MAGIC).copysign(x);
        if x.is_nan() {
            x
        } else if magnitude >= F16_OVERFLOW {
            f32::INFINITY.copysign(x)
        } else if magnitude < F16_MIN_NORMAL {
            subnormal
        } else {
            normal
        }
    }
}

/// Rounds every value of `values` to `dtype` (no change for f32 and wider dtypes). Inlined so
/// that the loop is vectorized for the instruction set of the kernel body that calls it.
#[inline(always)]
pub(crate) fn round_slice(values: &mut [f32], dtype: DType) {
    #[inline(always)]
    fn each<N: Narrow>(values: &mut [f32]) {
        for x in values {
            *x = N::round(*x);
        }
    }
    match dtype {
        DType::BF16 => each::<ToBf16>(values),
        DType::F16 => each::<ToF16>(values),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    /// Every 7th f32 bit pattern plus every pattern whose low 16 bits are near a bf16 or f16
    /// rounding boundary (ties and their neighbours), both signs.
    fn samples() -> impl Iterator<Item = f32> {
        let strided = (0..=u32::MAX).step_by(7);
        let boundaries = (0..=u32::MAX >> 16).flat_map(|high| {
            [
                0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x7fff, 0x8000, 0x8001, 0xffff,
            ]
            .into_iter()
            .flat_map(move |low| [(high << 16) | low, (high << 16) | low ^ 0x2000])
        });
        strided.chain(boundaries).map(f32::from_bits)
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn bf16_bits_of_a_rounding_round_once_more() {
        for x in samples().step_by(97) {
            assert_eq!(KeepF32::bf16_bits_of_round(x), bf16_bits(x));
            assert_eq!(ToBf16::bf16_bits_of_round(x), bf16_bits(ToBf16::round(x)));
            assert_eq!(ToF16::bf16_bits_of_round(x), bf16_bits(ToF16::round(x)));
        }
    }

    #[test]
    fn bf16_bits_match_half() {
        for x in samples() {
            let want = bf16::from_f32(x).to_bits();
            assert_eq!(bf16_bits(x), want, "{x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for x in samples() {
            let want = bf16::from_f32(x).to_f32();
            assert!(
                same(ToBf16::round(x), want),
                "{x:e}: {} != {want}",
                ToBf16::round(x)
            );
        }
    }

    #[test]
    fn f16_rounding_matches_half() {
        for x in samples() {
            let want = f16::from_f32(x).to_f32();
            assert!(
                same(ToF16::round(x), want),
                "{x:e}: {} != {want}",
                ToF16::round(x)
            );
        }
    }

    #[test]
    fn round_slice_by_dtype() {
        let mut v = [1.0 + f32::EPSILON, 65519.0, 65520.0, 1e-8];
        round_slice(&mut v, DType::F16);
        assert_eq!(v, [1.0, 65504.0, f32::INFINITY, 0.0]);
        let mut v = [1.0 + f32::EPSILON, 3.0e38];
        round_slice(&mut v, DType::F32);
        assert_eq!(v, [1.0 + f32::EPSILON, 3.0e38]);
        round_slice(&mut v, DType::BF16);
        assert_eq!(v, [1.0, bf16::from_f32(3.0e38).to_f32()]);
    }
}
