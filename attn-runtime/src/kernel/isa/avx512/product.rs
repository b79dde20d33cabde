//! The `f32` micro-kernel of the tile products ([`product_avx512`]: 6 rows × 64 columns, 24
//! accumulators in registers) and its micro-tile frame, which the `bf16`-pair micro-kernel of
//! `avx512_bf16.rs` shares: how a product is cut into tiles ([`for_each_tile`], [`RawTile`],
//! `instantiated_tile!`) and how a tile's accumulators are loaded and stored ([`start_tile`],
//! [`store_tile`], [`tile_lanes`]). Every `unsafe` block carries a `// SAFETY:` comment; each
//! `unsafe fn` states its contract under `# Safety`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::portable::product_portable;
use super::super::shared::{Isa, Product};

/// Rows of a micro-tile.
const TILE_ROWS: usize = 6;
/// 16-lane vectors per micro-tile row (64 columns).
const TILE_VECTORS: usize = 4;

/// [`Product`] with AVX-512 micro-kernels (6 rows × 64 columns, 24 accumulators).
///
/// Must be called only where [`Isa::detect`] returned an AVX-512 [`Isa`] (the flash kernel
/// calls it from inside [`with_features`](super::super::with_features)); otherwise it computes
/// with the portable code.
/// Panics if an index would fall outside `a`, `b` or `c` (a bug in the caller, never input).
#[inline]
pub(crate) fn product_avx512(p: &Product<'_, f32>, c: &mut [f32], ldc: usize) {
    assert!(p.in_bounds(c.len(), ldc), "tile product out of bounds");
    if p.rows == 0 || p.cols == 0 {
        return;
    }
    if p.depth == 0 || !Isa::detect().has_avx512() {
        product_portable(p, c, ldc);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for_each_tile(p, c, ldc, |rows, vectors, tile| {
        // SAFETY: the CPU has AVX-512F (checked above); `for_each_tile` gives 1 ≤ rows ≤ 6,
        // 1 ≤ vectors ≤ 4 and a tile whose accesses lie inside the operands.
        unsafe { dispatch_tile(rows, vectors, &tile) }
    });
}

/// Splits the product (already checked by [`Product::in_bounds`] against `c` and `ldc`) into
/// micro-tiles of at most 6 rows × 4 vectors of 16 lanes and calls `run(rows, vectors, tile)`
/// for each. Every tile satisfies the contract of [`tile`]: its accesses lie inside `a`, `b`
/// and `c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(in super::super) fn for_each_tile<T>(
    p: &Product<'_, T>,
    c: &mut [f32],
    ldc: usize,
    mut run: impl FnMut(usize, usize, RawTile<T>),
) {
    let mut row = 0;
    while row < p.rows {
        let rows = TILE_ROWS.min(p.rows - row);
        let mut col = 0;
        while col < p.cols {
            let cols = (16 * TILE_VECTORS).min(p.cols - col);
            let vectors = cols.div_ceil(16);
            let tail = cols - 16 * (vectors - 1);
            run(
                rows,
                vectors,
                RawTile {
                    // `row < p.rows` and `col < p.cols`, so these offsets are at most the last
                    // indices checked by `in_bounds`.
                    a: p.a[row * p.a_row..].as_ptr(),
                    a_row: p.a_row,
                    a_step: p.a_step,
                    b: p.b[col..].as_ptr(),
                    b_step: p.b_step,
                    c: c[row * ldc + col..].as_mut_ptr(),
                    ldc,
                    depth: p.depth,
                    tail_mask: if tail == 16 {
                        u16::MAX
                    } else {
                        (1u16 << tail) - 1
                    },
                    accumulate: p.accumulate,
                    scale: p.scale,
                },
            );
            col += cols;
        }
        row += rows;
    }
}

/// Raw operands of one micro-tile (see [`for_each_tile`] for the bounds they satisfy):
/// `a` and `b` hold `f32` values or `bf16` pairs (`u32`), `c` is `f32`.
#[cfg(target_arch = "x86_64")]
pub(in super::super) struct RawTile<T> {
    pub(in super::super) a: *const T,
    pub(in super::super) a_row: usize,
    pub(in super::super) a_step: usize,
    pub(in super::super) b: *const T,
    pub(in super::super) b_step: usize,
    pub(in super::super) c: *mut f32,
    pub(in super::super) ldc: usize,
    pub(in super::super) depth: usize,
    pub(in super::super) tail_mask: u16,
    pub(in super::super) accumulate: bool,
    pub(in super::super) scale: f32,
}

/// `$tile::<R, V>($t)` for `R = $rows` (1..=6) and `V = $vectors` (1..=4); larger values
/// take 6 and 4, which the callers' contracts exclude.
#[cfg(target_arch = "x86_64")]
macro_rules! instantiated_tile {
    ($tile:ident, $rows:expr, $vectors:expr, $t:expr) => {{
        macro_rules! by_vectors {
            ($r:literal) => {
                match $vectors {
                    1 => $tile::<$r, 1>($t),
                    2 => $tile::<$r, 2>($t),
                    3 => $tile::<$r, 3>($t),
                    _ => $tile::<$r, 4>($t),
                }
            };
        }
        match $rows {
            1 => by_vectors!(1),
            2 => by_vectors!(2),
            3 => by_vectors!(3),
            4 => by_vectors!(4),
            5 => by_vectors!(5),
            _ => by_vectors!(6),
        }
    }};
}
/// The macro, for the `bf16`-pair micro-kernel of `avx512_bf16.rs`.
#[cfg(target_arch = "x86_64")]
pub(in super::super) use instantiated_tile;

/// Calls the micro-kernel instantiated for `rows × vectors`.
///
/// # Safety
/// The CPU supports AVX-512F, `1 <= rows <= 6`, `1 <= vectors <= 4`, and every access described
/// on [`tile`] is in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dispatch_tile(rows: usize, vectors: usize, t: &RawTile<f32>) {
    // SAFETY: the call is `tile::<rows, vectors>` (6 and 4 for anything larger, which the
    // contract excludes); the contract of this function is `tile`'s.
    unsafe { instantiated_tile!(tile, rows, vectors, t) }
}

/// The lanes of vector `v` of a row of an `R × V` tile: all 16, but `tail_mask` in the last.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(in super::super) fn tile_lanes<const V: usize, T>(t: &RawTile<T>, v: usize) -> u16 {
    if v + 1 == V { t.tail_mask } else { u16::MAX }
}

/// The accumulators an `R × V` tile starts from: its block of `c` when it adds to `c`
/// unscaled, else 0 (a scaled product is summed from 0, and [`store_tile`] adds `c` after
/// scaling).
///
/// # Safety
/// The CPU supports AVX-512F; for r < R, v < V and every lane l of vector v allowed by
/// [`tile_lanes`], `c + r·ldc + 16v + l` is in bounds.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn start_tile<T, const R: usize, const V: usize>(
    t: &RawTile<T>,
) -> [[__m512; V]; R] {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if t.accumulate && t.scale == 1.0 {
        for (r, acc_row) in acc.iter_mut().enumerate() {
            for (v, acc_v) in acc_row.iter_mut().enumerate() {
                let lanes = tile_lanes::<V, T>(t, v);
                // SAFETY: row r < R, lanes allowed by the mask: in bounds by the contract.
                *acc_v = unsafe { _mm512_maskz_loadu_ps(lanes, t.c.add(r * t.ldc + 16 * v)) };
            }
        }
    }
    acc
}

/// Stores the sums of an `R × V` tile started by [`start_tile`]: `c = scale · acc` (plus
/// `c` when the tile adds to it and `scale ≠ 1`; with `scale = 1` the sums started from `c`).
///
/// # Safety
/// As [`start_tile`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn store_tile<T, const R: usize, const V: usize>(
    t: &RawTile<T>,
    acc: [[__m512; V]; R],
) {
    let scale = _mm512_set1_ps(t.scale);
    for (r, acc_row) in acc.iter().enumerate() {
        for (v, &acc_v) in acc_row.iter().enumerate() {
            let lanes = tile_lanes::<V, T>(t, v);
            let c = t.c.wrapping_add(r * t.ldc + 16 * v);
            let value = if t.scale == 1.0 {
                acc_v
            } else if t.accumulate {
                // SAFETY: row r < R, lanes allowed by the mask: in bounds by the contract.
                let old = unsafe { _mm512_maskz_loadu_ps(lanes, c) };
                _mm512_add_ps(old, _mm512_mul_ps(scale, acc_v))
            } else {
                _mm512_mul_ps(scale, acc_v)
            };
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(c, lanes, value) };
        }
    }
}

/// `R × V` vectors of `c` (=|+=) `a · b` over `t.depth`, accumulators held in registers.
///
/// # Safety
/// The CPU supports AVX-512F; for r < R, k < depth, v < V and every lane l of vector v allowed
/// by the mask (all 16 lanes except in the last vector, where `tail_mask` applies):
/// `a + r·a_row + k·a_step`, `b + k·b_step + 16v + l` and `c + r·ldc + 16v + l` are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(t: &RawTile<f32>) {
    let lanes = |v: usize| tile_lanes::<V, _>(t, v);
    // SAFETY: the contract of this function covers `c`'s accesses.
    let mut acc = unsafe { start_tile::<_, R, V>(t) };
    for k in 0..t.depth {
        let mut b = [_mm512_setzero_ps(); V];
        for (v, b_v) in b.iter_mut().enumerate() {
            // SAFETY: k < depth, lanes allowed by the mask: in bounds by the contract.
            *b_v = unsafe { _mm512_maskz_loadu_ps(lanes(v), t.b.add(k * t.b_step + 16 * v)) };
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: r < R and k < depth: in bounds by the contract.
            let a = _mm512_set1_ps(unsafe { *t.a.add(r * t.a_row + k * t.a_step) });
            for (acc_v, b_v) in acc_row.iter_mut().zip(&b) {
                *acc_v = _mm512_fmadd_ps(a, *b_v, *acc_v);
            }
        }
    }
    // SAFETY: the contract of this function covers `c`'s accesses.
    unsafe { store_tile::<_, R, V>(t, acc) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `c (=|+=) scale · (a · b)` on odd sizes (partial tiles of rows and of lanes), against
    /// f64 sums: the AVX-512 micro-kernel where the CPU has it, and the portable loops.
    #[test]
    fn products_scale_and_accumulate_as_documented() {
        let (rows, cols, depth, ldc) = (7, 37, 19, 41);
        let a: Vec<f32> = (0..rows * depth).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..depth * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let c0: Vec<f32> = (0..rows * ldc)
            .map(|i| (i as f32 * 0.05).sin() * 3.0)
            .collect();
        for scale in [1.0f32, 0.125, -3.0] {
            for accumulate in [false, true] {
                let p = Product {
                    a: &a,
                    a_row: depth,
                    a_step: 1,
                    b: &b,
                    b_step: cols,
                    rows,
                    cols,
                    depth,
                    accumulate,
                    scale,
                };
                let mut simd = c0.clone();
                product_avx512(&p, &mut simd, ldc);
                let mut portable = c0.clone();
                product_portable(&p, &mut portable, ldc);
                for r in 0..rows {
                    for j in 0..ldc {
                        let at = r * ldc + j;
                        let want = if j >= cols {
                            f64::from(c0[at])
                        } else {
                            let sum: f64 = (0..depth)
                                .map(|k| f64::from(a[r * depth + k]) * f64::from(b[k * cols + j]))
                                .sum();
                            let start = if accumulate { f64::from(c0[at]) } else { 0.0 };
                            start + f64::from(scale) * sum
                        };
                        for (name, got) in [("avx512", simd[at]), ("portable", portable[at])] {
                            assert!(
                                (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{name}, scale {scale}, accumulate {accumulate}, ({r}, {j}): \
                                 {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
