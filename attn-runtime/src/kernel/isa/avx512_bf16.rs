//! The AVX512-BF16 backend: products of `bf16` operands by the dot-product instruction
//! `vdpbf16ps` (two `bf16` products per `f32` lane, accumulated in `f32`), behind the safe,
//! bounds-checked [`product_bf16_pairs`], which checks [`Isa::detect`] itself and computes with
//! the portable loops elsewhere. The micro-tile frame (how a product is cut into tiles, how a
//! tile's accumulators are loaded and stored) is `avx512/product.rs`'s; only the inner loop
//! differs. Every `unsafe` block carries a `// SAFETY:` comment; each `unsafe fn` states its
//! contract.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::avx512::{
    RawTile, for_each_tile, instantiated_tile, start_tile, store_tile, tile_lanes,
};
use super::portable::product_bf16_pairs_portable;
use super::shared::{Isa, Product};

/// [`Product`] of `bf16` pairs into `f32`: every `u32` of `a` and `b` holds two `bf16` values
/// that are consecutive along the summation (the first in the low half), and `depth` counts
/// pairs, so `c[r·ldc + col] (= or +=) Σₚ lo(a)·lo(b) + hi(a)·hi(b)`. Each product of two
/// `bf16` values is exact in `f32`; the sums are `f32`.
///
/// Runs `vdpbf16ps` micro-kernels (6 rows × 64 columns, 32 products per instruction) where
/// [`Isa::detect`] returned [`Isa::Avx512Bf16`], else portable code.
/// Panics if an index would fall outside `a`, `b` or `c` (a bug in the caller, never input).
#[inline]
pub(crate) fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [f32], ldc: usize) {
    assert!(p.in_bounds(c.len(), ldc), "tile product out of bounds");
    if p.rows == 0 || p.cols == 0 {
        return;
    }
    if p.depth == 0 || Isa::detect() != Isa::Avx512Bf16 {
        product_bf16_pairs_portable(p, c, ldc);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for_each_tile(p, c, ldc, |rows, vectors, tile| {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above); `for_each_tile` gives
        // 1 ≤ rows ≤ 6, 1 ≤ vectors ≤ 4 and a tile whose accesses lie inside the operands.
        unsafe { dispatch_tile_bf16_pairs(rows, vectors, &tile) }
    });
}

/// Calls the `bf16`-pair micro-kernel instantiated for `rows × vectors`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16, `1 <= rows <= 6`, `1 <= vectors <= 4`, and every
/// access described on [`tile_bf16_pairs`] is in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dispatch_tile_bf16_pairs(rows: usize, vectors: usize, t: &RawTile<u32>) {
    // SAFETY: the call is `tile_bf16_pairs::<rows, vectors>` (6 and 4 for anything larger,
    // which the contract excludes); the contract of this function is its own.
    unsafe { instantiated_tile!(tile_bf16_pairs, rows, vectors, t) }
}

/// `R × V` vectors of `c` (=|+=) `a · b` over `t.depth` pairs of `bf16`, by `vdpbf16ps`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; for r < R, k < depth, v < V and every lane l of
/// vector v allowed by the mask (all 16 lanes except in the last vector, where `tail_mask`
/// applies): `a + r·a_row + k·a_step`, `b + k·b_step + 16v + l` and `c + r·ldc + 16v + l` are in
/// bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_pairs<const R: usize, const V: usize>(t: &RawTile<u32>) {
    let lanes = |v: usize| tile_lanes::<V, _>(t, v);
    // SAFETY: the contract of this function covers `c`'s accesses.
    let mut acc = unsafe { start_tile::<_, R, V>(t) };
    // `__m512i` and `__m512bh` are both 64 bytes of plain lanes: the reinterpretation reads
    // each 32-bit lane as two `bf16` values.
    let as_pairs = |x: __m512i| -> __m512bh {
        // SAFETY: same size, every bit pattern is a valid value of either type.
        unsafe { core::mem::transmute::<__m512i, __m512bh>(x) }
    };
    for k in 0..t.depth {
        let mut b = [as_pairs(_mm512_setzero_si512()); V];
        for (v, b_v) in b.iter_mut().enumerate() {
            // SAFETY: k < depth, lanes allowed by the mask: in bounds by the contract.
            *b_v = as_pairs(unsafe {
                _mm512_maskz_loadu_epi32(lanes(v), t.b.add(k * t.b_step + 16 * v).cast())
            });
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: r < R and k < depth: in bounds by the contract.
            let a = unsafe { *t.a.add(r * t.a_row + k * t.a_step) };
            let a = as_pairs(_mm512_set1_epi32(a as i32));
            for (acc_v, b_v) in acc_row.iter_mut().zip(&b) {
                *acc_v = _mm512_dpbf16_ps(*acc_v, a, *b_v);
            }
        }
    }
    // SAFETY: the contract of this function covers `c`'s accesses.
    unsafe { store_tile::<_, R, V>(t, acc) }
}
