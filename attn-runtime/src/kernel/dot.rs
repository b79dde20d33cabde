//! A dot product that vectorizes without `-ffast-math`: the products are accumulated in 16
//! interleaved partial sums (one AVX-512 register of `f32`), folded pairwise at the end. The
//! order of operations depends only on the length, so the result does not depend on the thread
//! that computes it.
//!
//! [`Dot`] chooses the code per element type: the portable loops of [`isa::dot_portable`] and
//! [`isa::axpy_portable`], or for `f32` the AVX-512 code of the `isa` backends where the CPU
//! has it (the same bits). It imports [`isa`]; `isa` does not import it.

use std::ops::{Add, Mul};

use super::isa::{self, axpy_portable, dot_portable};

/// Element types of [`dot`].
pub(crate) trait Dot: Copy + Default + Add<Output = Self> + Mul<Output = Self> {
    /// [`dot`] of two slices of this type.
    #[inline(always)]
    fn dot(a: &[Self], b: &[Self]) -> Self {
        dot_portable(a, b)
    }

    /// `[dot(a[0], b[0]), .., dot(a[3], b[3])]` (slices of one length), with the same bits;
    /// an instruction set may compute the four at once.
    #[inline(always)]
    fn dot4(a: [&[Self]; 4], b: [&[Self]; 4]) -> [Self; 4] {
        [0, 1, 2, 3].map(|t| Self::dot(a[t], b[t]))
    }

    /// `y[k] += x · b[k]` over the shorter slice (a multiply, then an add).
    #[inline(always)]
    fn axpy(y: &mut [Self], x: Self, b: &[Self]) {
        axpy_portable(y, x, b);
    }
}

impl Dot for f64 {}

impl Dot for f32 {
    /// The AVX-512 code where the CPU has it (the same bits).
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        isa::dot_avx512(a, b).unwrap_or_else(|| dot_portable(a, b))
    }

    /// The AVX-512 code where the CPU has it (the same bits as four [`dot`]s).
    #[inline(always)]
    fn dot4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        isa::dot4_avx512(a, b).unwrap_or_else(|| [0, 1, 2, 3].map(|t| Self::dot(a[t], b[t])))
    }

    /// The AVX-512 code where the CPU has it (the same bits).
    #[inline(always)]
    fn axpy(y: &mut [f32], x: f32, b: &[f32]) {
        if !isa::axpy_avx512(y, x, b) {
            axpy_portable(y, x, b);
        }
    }
}

/// `Σ a[k]·b[k]` over the shorter of the two slices.
#[inline(always)]
pub(crate) fn dot<C: Dot>(a: &[C], b: &[C]) -> C {
    C::dot(a, b)
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn four_at_once_give_the_bits_of_four_dots() {
        use super::Dot;
        for n in [0usize, 1, 15, 16, 17, 64, 100, 128] {
            let v = |s: f32| (0..n).map(|k| (k as f32 * s).sin()).collect::<Vec<f32>>();
            let (a, b) = (
                [v(0.1), v(0.2), v(0.3), v(0.4)],
                [v(0.5), v(0.6), v(0.7), v(0.8)],
            );
            let a = [&a[0][..], &a[1], &a[2], &a[3]];
            let b = [&b[0][..], &b[1], &b[2], &b[3]];
            let four = f32::dot4(a, b);
            for t in 0..4 {
                assert_eq!(four[t].to_bits(), dot(a[t], b[t]).to_bits(), "n={n} t={t}");
            }
        }
    }

    #[test]
    fn matches_a_float64_sum_for_every_length_around_the_lane_count() {
        for n in [0usize, 1, 7, 15, 16, 17, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|k| (k as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                "n={n}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn uses_the_shorter_slice() {
        assert_eq!(dot(&[1.0f64, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }
}
