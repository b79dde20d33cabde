//! The AVX-512 backend (AVX-512F, with AVX2 and FMA): the generic kernel bodies ([`Body`])
//! compiled for 512-bit vectors through a `#[target_feature]` trampoline, and hand-written
//! kernels behind safe, bounds-checked entry points that check [`Isa::detect`] themselves:
//! - [`product_avx512`]: the `f32` micro-kernel of the tile products (6 rows × 64 columns, 24
//!   accumulators), whose micro-tile frame ([`for_each_tile`], [`RawTile`], [`start_tile`],
//!   [`store_tile`]) `avx512_bf16.rs` shares;
//! - [`transpose_16x16_avx512`], [`transpose_16x16_bits_avx512`]: a 16 × 16 block transposed
//!   in the registers;
//! - [`dot_avx512`], [`dot4_avx512`], [`axpy_avx512`]: the dot products and axpy of short
//!   queries, with the bits of the portable loops.
//!
//! Every `unsafe` block here carries a `// SAFETY:` comment; each `unsafe fn` states its
//! contract under `# Safety`. Where the CPU lacks AVX-512 the entry points compute with (or
//! return to) the portable code of `portable.rs`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::super::exp::Fused;
use super::portable::product_portable;
use super::shared::{Body, Isa, Product};

/// `K::run` compiled for AVX-512F, AVX2 and FMA where [`Isa::detect`] found them; `input`
/// handed back otherwise (the caller then runs the portable build).
#[inline]
pub(super) fn run<K: Body>(input: K::Input) -> Result<K::Output, K::Input> {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx512() {
        // SAFETY: `Isa::detect` found AVX-512F, AVX2 and FMA on this CPU, which are the
        // features `run_avx512` is compiled with.
        return Ok(unsafe { run_avx512::<K>(input) });
    }
    Err(input)
}

/// `K::run` with fused multiply-adds, compiled for AVX-512F, AVX2 and FMA.
///
/// # Safety
/// The CPU supports AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: Body>(input: K::Input) -> K::Output {
    K::run::<Fused>(input)
}

/// Rows of a micro-tile.
const TILE_ROWS: usize = 6;
/// 16-lane vectors per micro-tile row (64 columns).
const TILE_VECTORS: usize = 4;

/// [`Product`] with AVX-512 micro-kernels (6 rows × 64 columns, 24 accumulators).
///
/// Must be called only where [`Isa::detect`] returned an AVX-512 [`Isa`] (the flash kernel
/// calls it from inside [`with_features`](super::with_features)); otherwise it computes with the
/// portable code.
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

/// `dst[d · ld + j] = src[j · src_row + d] · scale` for `j, d < 16`: a 16 × 16 block
/// transposed in the AVX-512 registers (16 loads, 64 shuffles, 16 stores, where a copy through
/// memory moves one value at a time). Returns `false`, writing nothing, where [`Isa::detect`]
/// found no AVX-512. Panics if a row of the block would fall outside `src` or `dst`.
#[inline]
pub(crate) fn transpose_16x16_avx512(
    src: &[f32],
    src_row: usize,
    scale: f32,
    dst: &mut [f32],
    ld: usize,
) -> bool {
    transpose_16x16_words(src, src_row, Some(scale), dst, ld)
}

/// [`transpose_16x16_avx512`] of 32-bit words moved as they are (no arithmetic touches them,
/// so the bits of `bf16` pairs come through unchanged).
#[inline]
pub(crate) fn transpose_16x16_bits_avx512(
    src: &[u32],
    src_row: usize,
    dst: &mut [u32],
    ld: usize,
) -> bool {
    transpose_16x16_words(src, src_row, None, dst, ld)
}

/// The 32-bit element types [`transpose_16x16_words`] moves.
trait Word32: Copy {}
impl Word32 for f32 {}
impl Word32 for u32 {}

/// The two transposes above: words times `scale` (only ever given for `f32`) or moved as
/// they are.
#[inline]
fn transpose_16x16_words<T: Word32>(
    src: &[T],
    src_row: usize,
    scale: Option<f32>,
    dst: &mut [T],
    ld: usize,
) -> bool {
    assert!(
        src.len() >= 15 * src_row + 16 && dst.len() >= 15 * ld + 16,
        "16 × 16 transpose out of bounds"
    );
    if !Isa::detect().has_avx512() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked above) and the assertion above keeps the 16
        // rows of 16 words read from `src` and written to `dst` inside the slices; `T` is
        // `f32` or `u32`, of the size and alignment of `f32`, and a `u32` block comes without
        // a scale, so that its words are only loaded, shuffled and stored.
        unsafe {
            transpose_16x16(
                src.as_ptr().cast::<f32>(),
                src_row,
                scale,
                dst.as_mut_ptr().cast::<f32>(),
                ld,
            )
        };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`transpose_16x16_avx512`]'s body (values times `scale` if given, else moved bit for bit).
///
/// # Safety
/// The CPU supports AVX-512F; `src + j · src_row` and `dst + d · ld` are valid for 16 `f32`
/// each for `j, d < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(
    src: *const f32,
    src_row: usize,
    scale: Option<f32>,
    dst: *mut f32,
    ld: usize,
) {
    let rows: [__m512; 16] = std::array::from_fn(|j| {
        // SAFETY: row j < 16 of the block, valid by the contract.
        let row = unsafe { _mm512_loadu_ps(src.add(j * src_row)) };
        match scale {
            Some(scale) => _mm512_mul_ps(row, _mm512_set1_ps(scale)),
            None => row,
        }
    });
    // In each 128-bit lane ℓ (values 4ℓ..4ℓ + 3 of a row): pairs of rows interleaved, then
    // `columns[4k + m]` holds value 4ℓ + m of rows 4k..4k + 3.
    let pairs: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i / 2 * 2], rows[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let columns: [__m512; 16] = std::array::from_fn(|i| {
        let (k, m) = (i / 4, i % 4);
        let (lo, hi) = (pairs[4 * k + m / 2], pairs[4 * k + 2 + m / 2]);
        if m % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(lo, hi)
        } else {
            _mm512_shuffle_ps::<0xEE>(lo, hi)
        }
    });
    // Row 4ℓ + m of the result is lane ℓ of columns m, 4 + m, 8 + m and 12 + m: a 4 × 4
    // transpose of 128-bit lanes.
    for m in 0..4 {
        let [a, b, c, d] = [columns[m], columns[4 + m], columns[8 + m], columns[12 + m]];
        let (ab_low, ab_high) = (
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        );
        let (cd_low, cd_high) = (
            _mm512_shuffle_f32x4::<0x44>(c, d),
            _mm512_shuffle_f32x4::<0xEE>(c, d),
        );
        let out = [
            _mm512_shuffle_f32x4::<0x88>(ab_low, cd_low),
            _mm512_shuffle_f32x4::<0xDD>(ab_low, cd_low),
            _mm512_shuffle_f32x4::<0x88>(ab_high, cd_high),
            _mm512_shuffle_f32x4::<0xDD>(ab_high, cd_high),
        ];
        for (lane, row) in out.into_iter().enumerate() {
            // SAFETY: row 4 · lane + m < 16 of the result, valid by the contract.
            unsafe { _mm512_storeu_ps(dst.add((4 * lane + m) * ld), row) };
        }
    }
}

/// `Σ a[k]·b[k]` over the shorter slice with the AVX-512 registers, in exactly the order of
/// [`dot_portable`](super::portable::dot_portable) (16 lanes of products added in order, the
/// tail zero-padded, the lanes
/// folded in halves), so the two give the same bits; `None` where [`Isa::detect`] found no
/// AVX-512. The compiler splits the portable loop into 2- and 4-lane pieces.
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

/// Splits the product (already checked by [`Product::in_bounds`] against `c` and `ldc`) into
/// micro-tiles of at most 6 rows × 4 vectors of 16 lanes and calls `run(rows, vectors, tile)`
/// for each. Every tile satisfies the contract of [`tile`]: its accesses lie inside `a`, `b`
/// and `c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn for_each_tile<T>(
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
pub(super) struct RawTile<T> {
    pub(super) a: *const T,
    pub(super) a_row: usize,
    pub(super) a_step: usize,
    pub(super) b: *const T,
    pub(super) b_step: usize,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) depth: usize,
    pub(super) tail_mask: u16,
    pub(super) accumulate: bool,
    pub(super) scale: f32,
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
pub(super) use instantiated_tile;

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
pub(super) fn tile_lanes<const V: usize, T>(t: &RawTile<T>, v: usize) -> u16 {
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
pub(super) unsafe fn start_tile<T, const R: usize, const V: usize>(
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
pub(super) unsafe fn store_tile<T, const R: usize, const V: usize>(
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

    #[test]
    fn transpose_16x16_moves_every_value_once_and_scales_it() {
        if !Isa::detect().has_avx512() {
            return;
        }
        let (src_row, ld) = (21, 19);
        let src: Vec<f32> = (0..15 * src_row + 16).map(|i| i as f32).collect();
        let mut dst = vec![-1.0f32; 15 * ld + 16 + 3];
        assert!(transpose_16x16_avx512(&src, src_row, 0.5, &mut dst, ld));
        for (i, &got) in dst.iter().enumerate() {
            let (d, j) = (i / ld, i % ld);
            let want = if d < 16 && j < 16 {
                src[j * src_row + d] * 0.5
            } else {
                -1.0
            };
            assert_eq!(got.to_bits(), want.to_bits(), "dst[{d}][{j}]");
        }
    }

    #[test]
    fn bits_transpose_moves_every_word_unchanged() {
        if !Isa::detect().has_avx512() {
            return;
        }
        let (src_row, ld) = (18, 23);
        // Words that arithmetic would change: signalling NaNs (quieted), subnormals (flushed
        // under DAZ), negative zero; and plain bf16 pairs.
        let special = [
            0x7f80_0001,
            0xff80_0001,
            0x0000_0001,
            0x8000_0000,
            0x3f80_bf80,
        ];
        let src: Vec<u32> = (0..15 * src_row + 16)
            .map(|i| special[i % 5] ^ ((i as u32) << 8))
            .collect();
        let mut dst = vec![7u32; 15 * ld + 16 + 2];
        assert!(transpose_16x16_bits_avx512(&src, src_row, &mut dst, ld));
        for (i, &got) in dst.iter().enumerate() {
            let (d, j) = (i / ld, i % ld);
            let want = if d < 16 && j < 16 {
                src[j * src_row + d]
            } else {
                7
            };
            assert_eq!(got, want, "dst[{d}][{j}]");
        }
    }

    #[test]
    fn avx512_code_gives_the_portable_bits() {
        for n in [0usize, 1, 15, 16, 17, 64, 100, 128, 131] {
            let a: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin() * 1e3).collect();
            let b: Vec<f32> = (0..n).map(|k| (k as f32 * 0.11).cos() / 7.0).collect();
            if let Some(got) = dot_avx512(&a, &b) {
                assert_eq!(
                    got.to_bits(),
                    super::super::portable::dot_portable(&a, &b).to_bits(),
                    "n={n}"
                );
            }
        }
    }
}
