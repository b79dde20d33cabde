//! The dot products and axpy of short queries (decoding) in the AVX-512 registers
//! ([`dot_avx512`], [`dot4_avx512`], [`axpy_avx512`]), each with the bits of the portable loop
//! of `portable.rs`. Every `unsafe` block carries a `// SAFETY:` comment; each `unsafe fn`
//! states its contract under `# Safety`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::shared::Isa;

/// `Σ a[k]·b[k]` over the shorter slice with the AVX-512 registers, in exactly the order of
/// [`dot_portable`](super::super::portable::dot_portable) (16 lanes of products added in
/// order, the tail zero-padded, the lanes folded in halves), so the two give the same bits;
/// `None` where [`Isa::detect`] found no AVX-512. The compiler splits the portable loop into 2-
/// and 4-lane pieces.
#[inline]
pub(crate) fn dot_avx512(a: &[f32], b: &[f32]) -> Option<f32> {
    if !Isa::detect().has_avx512() {
        return None;
    }
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked above) and the slices have the same length.
        Some(unsafe { dot_16_lanes(a, b) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b);
        None
    }
}

/// `y[k] += x · b[k]` over the shorter slice with the AVX-512 registers (a multiply, then an
/// add: the bits of the portable loop); `false` where [`Isa::detect`] found no AVX-512.
#[inline]
pub(crate) fn axpy_avx512(y: &mut [f32], x: f32, b: &[f32]) -> bool {
    if !Isa::detect().has_avx512() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above: `has_avx512` implies
        // all three, see `Isa::detect`).
        unsafe { axpy_16_lanes(y, x, b) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (y, x, b);
        false
    }
}

/// [`axpy_avx512`]'s body: the portable loop, vectorized by the compiler for 512-bit registers
/// (no fused multiply-add: the compiler never contracts `a * b + c` on its own).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_16_lanes(y: &mut [f32], x: f32, b: &[f32]) {
    for (o, &v) in y.iter_mut().zip(b) {
        *o += x * v;
    }
}

/// Four dot products `Σ a_n[k]·b_n[k]` at once (all slices of one length), each in exactly the
/// order of [`dot_avx512`] (so with the same bits): four independent chains of additions keep
/// the adder busy where one chain waits on each addition (a decoding step's logits of the
/// query heads that share a key/value head, or of four heads). `None` without AVX-512.
#[inline]
pub(crate) fn dot4_avx512(a: [&[f32]; 4], b: [&[f32]; 4]) -> Option<[f32; 4]> {
    let n = a[0].len();
    if !Isa::detect().has_avx512() || a.iter().chain(&b).any(|x| x.len() != n) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked above) and all eight slices have length `n`.
        Some(unsafe { dot4_16_lanes(a, b) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// [`dot4_avx512`]'s body.
///
/// # Safety
/// The CPU supports AVX-512F, and every slice of `a` and `b` has the length of `a[0]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_16_lanes(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a[0].len();
    let whole = n / 16 * 16;
    let mut partial = [_mm512_setzero_ps(); 4];
    let mut k = 0;
    while k < whole {
        for t in 0..4 {
            // SAFETY: k + 16 <= whole <= n, the length of every slice.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(a[t].as_ptr().add(k)),
                    _mm512_loadu_ps(b[t].as_ptr().add(k)),
                )
            };
            partial[t] = _mm512_add_ps(partial[t], _mm512_mul_ps(x, y));
        }
        k += 16;
    }
    if whole < n {
        let lanes: __mmask16 = (1u32 << (n - whole)) as u16 - 1;
        for t in 0..4 {
            // SAFETY: the mask allows only the n - whole < 16 lanes inside the slices; a
            // masked load does not access (or fault on) the lanes its mask excludes.
            let (x, y) = unsafe {
                (
                    _mm512_maskz_loadu_ps(lanes, a[t].as_ptr().add(whole)),
                    _mm512_maskz_loadu_ps(lanes, b[t].as_ptr().add(whole)),
                )
            };
            partial[t] = _mm512_add_ps(partial[t], _mm512_mul_ps(x, y));
        }
    }
    partial.map(|p| {
        // The fold of `dot_16_lanes`.
        let low = _mm512_castps512_ps256(p);
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p)));
        let eight = _mm256_add_ps(low, high);
        let four = _mm_add_ps(
            _mm256_castps256_ps128(eight),
            _mm256_extractf128_ps::<1>(eight),
        );
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
    })
}

/// [`dot_avx512`]'s body.
///
/// # Safety
/// The CPU supports AVX-512F, and `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_16_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let whole = n / 16 * 16;
    let mut partial = _mm512_setzero_ps();
    let mut k = 0;
    while k < whole {
        // SAFETY: k + 16 <= whole <= n = a.len() = b.len().
        let (x, y) = unsafe {
            (
                _mm512_loadu_ps(a.as_ptr().add(k)),
                _mm512_loadu_ps(b.as_ptr().add(k)),
            )
        };
        partial = _mm512_add_ps(partial, _mm512_mul_ps(x, y));
        k += 16;
    }
    if whole < n {
        // Lanes past the end read nothing and are 0 (as the portable code's zero padding).
        let lanes: __mmask16 = (1u32 << (n - whole)) as u16 - 1;
        // SAFETY: the mask allows only the n - whole < 16 lanes inside the slices; a masked
        // load does not access (or fault on) the lanes its mask excludes.
        let (x, y) = unsafe {
            (
                _mm512_maskz_loadu_ps(lanes, a.as_ptr().add(whole)),
                _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(whole)),
            )
        };
        partial = _mm512_add_ps(partial, _mm512_mul_ps(x, y));
    }
    // Lane l += lane l + 8, then l + 4, l + 2, l + 1 (the portable fold).
    let low = _mm512_castps512_ps256(partial);
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(partial)));
    let eight = _mm256_add_ps(low, high);
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps::<1>(eight),
    );
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_code_gives_the_portable_bits() {
        for n in [0usize, 1, 15, 16, 17, 64, 100, 128, 131] {
            let a: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin() * 1e3).collect();
            let b: Vec<f32> = (0..n).map(|k| (k as f32 * 0.11).cos() / 7.0).collect();
            if let Some(got) = dot_avx512(&a, &b) {
                assert_eq!(
                    got.to_bits(),
                    super::super::super::portable::dot_portable(&a, &b).to_bits(),
                    "n={n}"
                );
            }
        }
    }
}
