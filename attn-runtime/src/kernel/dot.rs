//! A dot product that vectorizes without `-ffast-math`: the products are accumulated in 16
//! interleaved partial sums (one AVX-512 register of `f32`), folded pairwise at the end. The
//! order of operations depends only on the length, so the result does not depend on the thread
//! that computes it.

use std::ops::{Add, Mul};

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
        super::simd::dot_avx512(a, b).unwrap_or_else(|| dot_portable(a, b))
    }

    /// The AVX-512 code where the CPU has it (the same bits as four [`dot`]s).
    #[inline(always)]
    fn dot4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        super::simd::dot4_avx512(a, b)
            .unwrap_or_else(|| [0, 1, 2, 3].map(|t| Self::dot(a[t], b[t])))
    }

    /// The AVX-512 code where the CPU has it (the same bits).
    #[inline(always)]
    fn axpy(y: &mut [f32], x: f32, b: &[f32]) {
        if !super::simd::axpy_avx512(y, x, b) {
            axpy_portable(y, x, b);
        }
    }
}

/// `Σ a[k]·b[k]` over the shorter of the two slices.
#[inline(always)]
pub(crate) fn dot<C: Dot>(a: &[C], b: &[C]) -> C {
    C::dot(a, b)
}

/// [`Dot::axpy`] in portable code.
#[inline(always)]
fn axpy_portable<C: Copy + Add<Output = C> + Mul<Output = C>>(y: &mut [C], x: C, b: &[C]) {
    for (o, &v) in y.iter_mut().zip(b) {
        *o = *o + x * v;
    }
}

/// [`dot`] in portable code.
#[inline(always)]
fn dot_portable<C>(a: &[C], b: &[C]) -> C
where
    C: Copy + Default + Add<Output = C> + Mul<Output = C>,
{
    const LANES: usize = 16;
    // One step: lane `l` adds `x[l]·y[l]`. The partial sums are only ever indexed by constants,
    // so that they stay in one vector register (a tail loop indexing them by a variable made
    // the compiler keep them in memory and split the main loop into 2- and 4-lane pieces).
    #[inline(always)]
    fn step<C: Copy + Add<Output = C> + Mul<Output = C>>(
        partial: &mut [C; LANES],
        x: &[C; LANES],
        y: &[C; LANES],
    ) {
        for l in 0..LANES {
            partial[l] = partial[l] + x[l] * y[l];
        }
    }
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut partial = [C::default(); LANES];
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        step(&mut partial, x, y);
    }
    if !a_tail.is_empty() {
        // The tail, padded with zeros (which add `0·0 = 0` to the other lanes).
        let (mut x, mut y) = ([C::default(); LANES], [C::default(); LANES]);
        x[..a_tail.len()].copy_from_slice(a_tail);
        y[..b_tail.len()].copy_from_slice(b_tail);
        step(&mut partial, &x, &y);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            partial[l] = partial[l] + partial[l + width];
        }
    }
    partial[0]
}

#[cfg(test)]
mod tests {
    use super::{dot, dot_portable};

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
    fn avx512_code_gives_the_portable_bits() {
        for n in [0usize, 1, 15, 16, 17, 64, 100, 128, 131] {
            let a: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin() * 1e3).collect();
            let b: Vec<f32> = (0..n).map(|k| (k as f32 * 0.11).cos() / 7.0).collect();
            if let Some(got) = crate::kernel::simd::dot_avx512(&a, &b) {
                assert_eq!(got.to_bits(), dot_portable(&a, &b).to_bits(), "n={n}");
            }
        }
    }

    #[test]
    fn uses_the_shorter_slice() {
        assert_eq!(dot(&[1.0f64, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }
}
