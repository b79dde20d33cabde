//! A dot product that vectorizes without `-ffast-math`: the products are accumulated in 16
//! interleaved partial sums (one AVX-512 register of `f32`), folded pairwise at the end. The
//! order of operations depends only on the length, so the result does not depend on the thread
//! that computes it.

use std::ops::{Add, Mul};

/// `Σ a[k]·b[k]` over the shorter of the two slices.
#[inline(always)]
pub(crate) fn dot<C>(a: &[C], b: &[C]) -> C
where
    C: Copy + Default + Add<Output = C> + Mul<Output = C>,
{
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut partial = [C::default(); LANES];
    let (a_main, a_tail) = a.split_at(n / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            partial[l] = partial[l] + ca[l] * cb[l];
        }
    }
    for (l, (&x, &y)) in a_tail.iter().zip(b_tail).enumerate() {
        partial[l] = partial[l] + x * y;
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
    use super::dot;

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
