//! CPU feature detection and the explicitly vectorized pieces of the kernels.
//!
//! This is the one module of the kernels with `unsafe` code. It holds:
//! - [`Isa`]: which instruction set the kernels use, detected once at run time (the shipped build
//!   must not rely on `-C target-cpu=native`);
//! - an AVX-512 micro-kernel for the small matrix products of the fused attention tile,
//!   behind the safe, bounds-checked [`product_avx512`];
//! - [`with_features`], which runs a generic, `#[inline(always)]` kernel [`Body`] compiled for
//!   the detected instruction set, so that its loops (row maxima, `exp`, sums, rescaling)
//!   auto-vectorize at that width.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::exp::{Fused, MulAdd, Unfused};

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// x86-64 with AVX-512F (plus AVX2 and FMA): explicit 512-bit micro-kernels.
    Avx512,
    /// x86-64 with AVX2 and FMA: the portable code compiled for 256-bit vectors.
    Avx2,
    /// Anything else: the portable code for the baseline target.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once, then cached).
    pub(crate) fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if avx2 {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Every instruction set that can run on this CPU, best first (tests run each of them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| match (Isa::detect(), isa) {
                (Isa::Avx512, _) => true,
                (Isa::Avx2, isa) => *isa != Isa::Avx512,
                (Isa::Portable, isa) => *isa == Isa::Portable,
            })
            .collect()
    }
}

/// A kernel body that [`with_features`] compiles once per instruction set.
pub(crate) trait Body {
    /// What the body takes.
    type Input;
    /// What the body returns.
    type Output;
    /// The body, with multiply–adds evaluated as `M` says (fused where the FMA feature is
    /// enabled). Implementations mark it `#[inline(always)]` (and everything it calls that
    /// should be vectorized too), so that it is inlined into the `#[target_feature]`
    /// trampolines below and its loops are vectorized for the instruction set.
    fn run<M: MulAdd>(input: Self::Input) -> Self::Output;
}

/// Runs `K::run` compiled for `isa`. An `isa` the CPU lacks falls back to the portable build
/// (never undefined behaviour).
#[inline]
pub(crate) fn with_features<K: Body>(isa: Isa, input: K::Input) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Avx512 if Isa::detect() == Isa::Avx512 => {
                // SAFETY: `Isa::detect` found AVX-512F, AVX2 and FMA on this CPU, which are
                // the features `run_avx512` is compiled with.
                return unsafe { run_avx512::<K>(input) };
            }
            Isa::Avx2 if Isa::detect() != Isa::Portable => {
                // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU (it reports `Avx512`
                // only when those are present as well).
                return unsafe { run_avx2::<K>(input) };
            }
            _ => {}
        }
    }
    let _ = isa;
    K::run::<Unfused>(input)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: Body>(input: K::Input) -> K::Output {
    K::run::<Fused>(input)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Body>(input: K::Input) -> K::Output {
    K::run::<Fused>(input)
}

/// One small matrix product of the fused attention tile:
/// `c[r·ldc + col] (= or +=) Σₚ a[r·a_row + p·a_step] · b[p·b_step + col]`
/// for `r < rows`, `col < cols`, `p < depth`.
///
/// `a` is read by broadcasting single elements (any strides); `b` and `c` rows are contiguous.
pub(crate) struct Product<'s, T> {
    /// Left operand.
    pub a: &'s [T],
    /// Distance in `a` between consecutive output rows.
    pub a_row: usize,
    /// Distance in `a` between consecutive summation indices.
    pub a_step: usize,
    /// Right operand.
    pub b: &'s [T],
    /// Distance in `b` between consecutive summation indices (rows of `b`).
    pub b_step: usize,
    /// Output rows.
    pub rows: usize,
    /// Output columns.
    pub cols: usize,
    /// Length of the summation.
    pub depth: usize,
    /// Add to `c` (`true`) or overwrite it (`false`).
    pub accumulate: bool,
}

impl<T> Product<'_, T> {
    /// Whether every index the product touches lies inside `a`, `b` and a `c` of `c_len`
    /// elements with row stride `ldc`.
    pub(crate) fn in_bounds(&self, c_len: usize, ldc: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last_a = (self.rows - 1) * self.a_row + self.depth.saturating_sub(1) * self.a_step;
        let last_b = self.depth.saturating_sub(1) * self.b_step + self.cols - 1;
        let last_c = (self.rows - 1) * ldc + self.cols - 1;
        (self.depth == 0 || (last_a < self.a.len() && last_b < self.b.len()))
            && last_c < c_len
            && ldc >= self.cols
    }
}

/// Rows of a micro-tile.
const TILE_ROWS: usize = 6;
/// 16-lane vectors per micro-tile row (64 columns).
const TILE_VECTORS: usize = 4;

/// [`Product`] with AVX-512 micro-kernels (6 rows × 64 columns, 24 accumulators).
///
/// Must be called only where [`Isa::detect`] returned [`Isa::Avx512`] (the flash kernel calls it
/// from inside [`with_features`]); otherwise it computes with the portable code.
/// Panics if an index would fall outside `a`, `b` or `c` (a bug in the caller, never input).
#[inline]
pub(crate) fn product_avx512(p: &Product<'_, f32>, c: &mut [f32], ldc: usize) {
    assert!(p.in_bounds(c.len(), ldc), "tile product out of bounds");
    if p.rows == 0 || p.cols == 0 {
        return;
    }
    if p.depth == 0 || Isa::detect() != Isa::Avx512 {
        super::flash::product_portable(p, c, ldc);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut row = 0;
        while row < p.rows {
            let rows = TILE_ROWS.min(p.rows - row);
            let mut col = 0;
            while col < p.cols {
                let cols = (16 * TILE_VECTORS).min(p.cols - col);
                let vectors = cols.div_ceil(16);
                let tail = cols - 16 * (vectors - 1);
                let tile = RawTile {
                    // SAFETY (of the pointer arithmetic): `row < p.rows` and `col < p.cols`,
                    // so these offsets are at most the last indices checked by `in_bounds`.
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
                };
                // SAFETY: the CPU has AVX-512F (checked above). The tile reads
                // a[(row + r)·a_row + k·a_step] for r < rows, k < depth; b[k·b_step + col + l]
                // and c[(row + r)·ldc + col + l] only for lanes l < cols (the last vector is
                // masked to `tail` lanes); `in_bounds` checked the largest of these indices.
                unsafe { dispatch_tile(rows, vectors, &tile) };
                col += cols;
            }
            row += rows;
        }
    }
}

/// Raw operands of one micro-tile (see [`product_avx512`] for the bounds they satisfy).
#[cfg(target_arch = "x86_64")]
struct RawTile {
    a: *const f32,
    a_row: usize,
    a_step: usize,
    b: *const f32,
    b_step: usize,
    c: *mut f32,
    ldc: usize,
    depth: usize,
    tail_mask: u16,
    accumulate: bool,
}

/// Calls the micro-kernel instantiated for `rows × vectors`.
///
/// # Safety
/// The CPU supports AVX-512F, `1 <= rows <= 6`, `1 <= vectors <= 4`, and every access described
/// on [`tile`] is in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dispatch_tile(rows: usize, vectors: usize, t: &RawTile) {
    macro_rules! by_vectors {
        ($rows:literal) => {
            match vectors {
                1 => tile::<$rows, 1>(t),
                2 => tile::<$rows, 2>(t),
                3 => tile::<$rows, 3>(t),
                _ => tile::<$rows, 4>(t),
            }
        };
    }
    // SAFETY: every arm calls `tile` with R = rows and V = vectors (6 and 4 for anything
    // larger, which the contract excludes); the contract of this function is `tile`'s.
    unsafe {
        match rows {
            1 => by_vectors!(1),
            2 => by_vectors!(2),
            3 => by_vectors!(3),
            4 => by_vectors!(4),
            5 => by_vectors!(5),
            _ => by_vectors!(6),
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
unsafe fn tile<const R: usize, const V: usize>(t: &RawTile) {
    let lanes = |v: usize| if v + 1 == V { t.tail_mask } else { u16::MAX };
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if t.accumulate {
        for (r, acc_row) in acc.iter_mut().enumerate() {
            for (v, acc_v) in acc_row.iter_mut().enumerate() {
                // SAFETY: row r < R, lanes allowed by the mask: in bounds by the contract.
                *acc_v = unsafe { _mm512_maskz_loadu_ps(lanes(v), t.c.add(r * t.ldc + 16 * v)) };
            }
        }
    }
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
    for (r, acc_row) in acc.iter().enumerate() {
        for (v, acc_v) in acc_row.iter().enumerate() {
            // SAFETY: row r < R, lanes allowed by the mask: in bounds by the contract.
            unsafe { _mm512_mask_storeu_ps(t.c.add(r * t.ldc + 16 * v), lanes(v), *acc_v) };
        }
    }
}
