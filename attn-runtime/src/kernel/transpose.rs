//! The tiled transpose both kernel paths lay their operands out with.

use super::isa;

/// The side of the square tiles [`transpose_tile`] works in: 16 source rows are read 16 values
/// (one cache line of f32) at a time, and each of the 16 rows of the result they go to gets
/// 16 consecutive values.
pub(super) const TRANSPOSE_TILE: usize = 16;

/// Copies the `rows × cols` block (at most [`TRANSPOSE_TILE`] each) whose row `j` starts at
/// `src(j)` into `dst` transposed (row `d` of the result at `dst[d * ld..][..rows]`), converting
/// each value, through `tile`: rows of the source and of the result often lie a power of two
/// apart and would evict each other from the same cache sets if copied value by value. Full
/// tiles have constant bounds, so that their loops vectorize.
#[inline(always)]
pub(super) fn transpose_tile<'s, X: Copy + 's, Y: Copy>(
    tile: &mut [[Y; TRANSPOSE_TILE]; TRANSPOSE_TILE],
    (rows, cols): (usize, usize),
    src: impl Fn(usize) -> &'s [X],
    convert: impl Fn(X) -> Y,
    dst: &mut [Y],
    ld: usize,
) {
    const N: usize = TRANSPOSE_TILE;
    if rows == N && cols == N {
        for (j, row) in tile.iter_mut().enumerate() {
            for (y, &x) in row.iter_mut().zip(&src(j)[..N]) {
                *y = convert(x);
            }
        }
        for d in 0..N {
            for (y, row) in dst[d * ld..][..N].iter_mut().zip(&*tile) {
                *y = row[d];
            }
        }
    } else {
        for (j, row) in tile.iter_mut().enumerate().take(rows) {
            for (y, &x) in row.iter_mut().zip(&src(j)[..cols]) {
                *y = convert(x);
            }
        }
        for d in 0..cols {
            for (y, row) in dst[d * ld..][..rows].iter_mut().zip(&*tile) {
                *y = row[d];
            }
        }
    }
}

/// [`transpose_tile`] of `f32` into `f32` times `scale`, the rows of the block `src_row` apart
/// from the start of `src`: a whole tile goes through the AVX-512 registers where the CPU has
/// them ([`isa::transpose_16x16_avx512`]; the portable tile stays scalar), a partial one
/// through `tile`.
#[inline(always)]
pub(super) fn transpose_tile_f32(
    tile: &mut [[f32; TRANSPOSE_TILE]; TRANSPOSE_TILE],
    (rows, cols): (usize, usize),
    (src, src_row): (&[f32], usize),
    scale: f32,
    dst: &mut [f32],
    ld: usize,
) {
    const N: usize = TRANSPOSE_TILE;
    if rows == N && cols == N && isa::transpose_16x16_avx512(src, src_row, scale, dst, ld) {
        return;
    }
    transpose_tile(
        tile,
        (rows, cols),
        |j| &src[j * src_row..],
        |x| x * scale,
        dst,
        ld,
    );
}

/// [`transpose_tile`] of 32-bit words (`bf16` pairs) moved as they are, the rows of the block
/// `src_row` apart from the start of `src`: a whole tile through the AVX-512 registers where
/// the CPU has them ([`isa::transpose_16x16_bits_avx512`]), else through `tile`.
#[inline(always)]
pub(super) fn transpose_tile_u32(
    tile: &mut [[u32; TRANSPOSE_TILE]; TRANSPOSE_TILE],
    (rows, cols): (usize, usize),
    (src, src_row): (&[u32], usize),
    dst: &mut [u32],
    ld: usize,
) {
    const N: usize = TRANSPOSE_TILE;
    if rows == N && cols == N && isa::transpose_16x16_bits_avx512(src, src_row, dst, ld) {
        return;
    }
    transpose_tile(tile, (rows, cols), |j| &src[j * src_row..], |x| x, dst, ld);
}
