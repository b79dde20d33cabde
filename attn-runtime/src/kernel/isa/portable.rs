//! The portable backend: plain loops for the baseline target, which the compiler vectorizes at
//! the width [`with_features`](super::with_features) compiles them for, and the fallback of
//! every other backend (a backend whose instruction set the CPU lacks, or an edge it does not
//! cover, computes here). It holds the portable tile products ([`product_portable`],
//! [`product_bf16_pairs_portable`]), the portable dot product and axpy ([`dot_portable`],
//! [`axpy_portable`]; the AVX-512 versions give the same bits), the reinterpretation of `bf16`
//! bits as pairs ([`as_u32_pairs`]) and the cache hint [`prefetch`] (SSE's, part of every
//! x86-64, so of the baseline there; nothing elsewhere).
//!
//! Its two `unsafe` blocks, each with its `// SAFETY:` comment, are the `align_to` of
//! [`as_u32_pairs`] and the prefetch hint. It imports only [`super::shared`].

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
use std::ops::{Add, Mul};

use super::shared::{Product, TileScalar};

/// [`Product`] with plain loops (the inner loop runs along contiguous rows and vectorizes).
/// Panics if an index would fall outside the operands (a bug in the caller).
#[inline(always)]
pub(crate) fn product_portable<T: TileScalar>(p: &Product<'_, T>, c: &mut [T], ldc: usize) {
    product_rows(p, c, ldc, |r, acc| {
        for k in 0..p.depth {
            let a = p.a[r * p.a_row + k * p.a_step];
            let b_row = &p.b[k * p.b_step..k * p.b_step + p.cols];
            for (c, &b) in acc.iter_mut().zip(b_row) {
                *c = *c + a * b;
            }
        }
    });
}

/// The frame of the portable products: checks the bounds, then for each row `r` lets
/// `add_products(r, acc)` add that row's products to `acc` and writes the row of `c` as
/// [`Product`] says. A scaled product is summed from 0 and scaled before `c` is added (as the
/// AVX-512 micro-kernels do); else the sums start from `c` (or 0).
/// Panics if an index would fall outside the operands (a bug in the caller).
#[inline(always)]
fn product_rows<T: TileScalar, X>(
    p: &Product<'_, X>,
    c: &mut [T],
    ldc: usize,
    mut add_products: impl FnMut(usize, &mut [T]),
) {
    assert!(p.in_bounds(c.len(), ldc), "tile product out of bounds");
    let scale = T::from_f64(p.scale.into());
    let mut sums = Vec::new();
    for r in 0..p.rows {
        let c_row = &mut c[r * ldc..r * ldc + p.cols];
        if p.scale == 1.0 {
            if !p.accumulate {
                c_row.fill(T::ZERO);
            }
            add_products(r, c_row);
        } else {
            sums.clear();
            sums.resize(p.cols, T::ZERO);
            add_products(r, &mut sums);
            for (c, &x) in c_row.iter_mut().zip(&sums) {
                *c = if p.accumulate {
                    *c + scale * x
                } else {
                    scale * x
                };
            }
        }
    }
}

/// [`product_bf16_pairs`](super::product_bf16_pairs) with plain loops, in the arithmetic `T`.
/// Panics if an index would fall outside the operands (a bug in the caller).
pub(crate) fn product_bf16_pairs_portable<T: TileScalar>(
    p: &Product<'_, u32>,
    c: &mut [T],
    ldc: usize,
) {
    let unpair = |x: u32| {
        (
            T::of(f32::from_bits(x << 16)),
            T::of(f32::from_bits(x & 0xFFFF_0000)),
        )
    };
    product_rows(p, c, ldc, |r, acc| {
        for k in 0..p.depth {
            let (a_lo, a_hi) = unpair(p.a[r * p.a_row + k * p.a_step]);
            let b_row = &p.b[k * p.b_step..k * p.b_step + p.cols];
            for (c, &b) in acc.iter_mut().zip(b_row) {
                let (b_lo, b_hi) = unpair(b);
                *c = *c + a_lo * b_lo + a_hi * b_hi;
            }
        }
    });
}

/// `y[k] += x · b[k]` over the shorter slice (a multiply, then an add) in portable code.
#[inline(always)]
pub(crate) fn axpy_portable<C: Copy + Add<Output = C> + Mul<Output = C>>(
    y: &mut [C],
    x: C,
    b: &[C],
) {
    for (o, &v) in y.iter_mut().zip(b) {
        *o = *o + x * v;
    }
}

/// `Σ a[k]·b[k]` over the shorter of the two slices in portable code: the products are
/// accumulated in 16 interleaved partial sums (one AVX-512 register of `f32`), folded pairwise
/// at the end, so the order of operations depends only on the length.
#[inline(always)]
pub(crate) fn dot_portable<C>(a: &[C], b: &[C]) -> C
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

/// `bits` read as pairs of consecutive values (element `i` of the result is `bits[2i]` in the
/// low half and `bits[2i + 1]` in the high half, on this little-endian target), without a
/// copy; `None` if `bits` does not start at a 4-byte boundary or has an odd length.
pub(crate) fn as_u32_pairs(bits: &[u16]) -> Option<&[u32]> {
    if cfg!(target_endian = "big") || !bits.len().is_multiple_of(2) {
        return None;
    }
    // SAFETY: every bit pattern is a valid `u32`, and `align_to` only puts elements in the
    // middle slice that are aligned for `u32` and lie inside `bits`.
    let (prefix, pairs, suffix) = unsafe { bits.align_to::<u32>() };
    (prefix.is_empty() && suffix.is_empty()).then_some(pairs)
}

/// Asks the CPU to bring the cache lines of `data` into L1: a hint, with no effect on any
/// result (nothing at all off x86-64).
#[inline(always)]
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = data.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: `start + offset` lies inside `data`; a prefetch never faults and changes
            // no memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
}
