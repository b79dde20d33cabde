//! The operands of the tile products laid out for them: the queries of a task scaled and
//! transposed ([`pack_queries`]) or, for the `bf16` products, rounded and paired along the
//! summation ([`pack_query_pairs`], [`pack_bf16_pairs`], [`pair`]), and rows of keys or values
//! borrowed in place or widened to the arithmetic type ([`rows_as`]).

use super::super::round::bf16_bits;
use super::super::transpose::{
    TRANSPOSE_TILE, transpose_tile, transpose_tile_f32, transpose_tile_u32,
};
use super::args::FlashArgs;
use super::dims::Rows;
use super::scratch::{Bf16Pairs, Scratch};
use super::tile::TileReal;
use crate::element::Element;

/// Packs the scaled, transposed queries of every head of the task: `query_t[h][k][r]`, zero in
/// the columns after the task's last row. Tiles of 16 rows × 16 values: a column of `query_t`
/// touches a cache line per value, so filled one query row at a time it left L1 long before
/// the row's next value came.
#[inline(always)]
pub(super) fn pack_queries<C: TileReal, E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    s: &mut Scratch<C>,
) {
    const N: usize = TRANSPOSE_TILE;
    let d = args.dims;
    let (depth, width) = (d.qk_depth, rows.width);
    let scale = C::from_f64(args.query_scale);
    let heads = rows.heads();
    let row_len = rows.heads * depth;
    let query_t = &mut s.query_t[heads.start * depth * width..heads.end * depth * width];
    // Query row `r` of the task starts at `row_start(r)`; rows are `stride` apart.
    let row_start =
        |r: usize| ((rows.b * d.q_len + rows.first + r) * d.heads + heads.start) * depth;
    let stride = d.heads * depth;
    let query_f32 = f32::direct(args.query);
    let mut tile = [[C::ZERO; N]; N];
    let mut tile_f32 = [[0.0f32; N]; N];
    for first_row in (0..rows.count).step_by(N) {
        for first in (0..row_len).step_by(N) {
            let block = (N.min(rows.count - first_row), N.min(row_len - first));
            let src = row_start(first_row) + first;
            let dst = first * width + first_row;
            if let (Some(query), Some(query_t)) = (query_f32, C::as_f32_mut(&mut *query_t)) {
                let scale = args.query_scale as f32;
                let src = (&query[src..], stride);
                transpose_tile_f32(&mut tile_f32, block, src, scale, &mut query_t[dst..], width);
                continue;
            }
            transpose_tile(
                &mut tile,
                block,
                |j| &args.query[src + j * stride..],
                |q| C::of(q) * scale,
                &mut query_t[dst..],
                width,
            );
        }
    }
    if rows.count < width {
        for column in query_t.chunks_exact_mut(width) {
            column[rows.count..].fill(C::ZERO);
        }
    }
}

/// [`pack_queries`] for the `bf16` products: `pairs.query[h][k / 2][r]`, each scaled query
/// rounded to `bf16` (Flax scales the query in its dtype).
#[inline(always)]
pub(super) fn pack_query_pairs<E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    pairs: &mut Bf16Pairs,
) {
    const N: usize = TRANSPOSE_TILE;
    let d = args.dims;
    let (depth, width) = (d.qk_depth, rows.width);
    let half_depth = depth.div_ceil(2);
    let row_pairs = d.heads * half_depth;
    let scale = args.query_scale as f32;
    let bits = |x: E| u32::from(bf16_bits(x.to_f32() * scale));
    pairs.query.clear();
    pairs.query.resize(d.heads * half_depth * width, 0);
    pairs.query_rows.resize(N * row_pairs, 0);
    let mut tile = [[0u32; N]; N];
    // 16 rows at a time: paired along each row (a contiguous pass), then transposed 16 × 16.
    for first in (0..rows.count).step_by(N) {
        let count = N.min(rows.count - first);
        for (r, out) in pairs
            .query_rows
            .chunks_exact_mut(row_pairs)
            .take(count)
            .enumerate()
        {
            let start = (rows.b * d.q_len + rows.first + first + r) * d.heads * depth;
            for h in rows.heads() {
                let q = &args.query[start + h * depth..start + (h + 1) * depth];
                let out = &mut out[h * half_depth..(h + 1) * half_depth];
                let (whole, last) = q.split_at(depth / 2 * 2);
                for (o, two) in out.iter_mut().zip(whole.chunks_exact(2)) {
                    *o = pair(bits(two[0]), bits(two[1]));
                }
                if let [x] = last {
                    out[half_depth - 1] = bits(*x);
                }
            }
        }
        for h in rows.heads() {
            for p in (0..half_depth).step_by(N) {
                transpose_tile_u32(
                    &mut tile,
                    (count, N.min(half_depth - p)),
                    (&pairs.query_rows[h * half_depth + p..], row_pairs),
                    &mut pairs.query[(h * half_depth + p) * width + first..],
                    width,
                );
            }
        }
    }
}

/// Packs a row of `bf16` bit patterns into pairs of consecutive elements (a zero after an odd
/// last one).
#[inline(always)]
pub(super) fn pack_bf16_pairs(row: &[u16], packed: &mut [u32]) {
    let (whole, last) = row.split_at(row.len() / 2 * 2);
    for (out, two) in packed.iter_mut().zip(whole.chunks_exact(2)) {
        *out = pair(two[0].into(), two[1].into());
    }
    if let (Some(&x), Some(out)) = (last.first(), packed.get_mut(whole.len() / 2)) {
        *out = x.into();
    }
}

/// Two `bf16` values as one pair, `lo` first along the summation.
#[inline(always)]
pub(super) fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

/// `count` rows of `row_len` elements of `src`, `row_stride` apart from `start`, as `C`:
/// borrowed with their stride when `src` already is `C`, else widened into `buf` (stride
/// `row_len`). Returns the rows and their stride. Inlined so that the widening loop is
/// compiled (and vectorized) for the instruction set of the task body.
#[inline(always)]
pub(super) fn rows_as<'s, C: TileReal, E: Element>(
    src: &'s [E],
    start: usize,
    row_stride: usize,
    row_len: usize,
    count: usize,
    buf: &'s mut Vec<C>,
) -> (&'s [C], usize) {
    if let Some(direct) = C::direct(src) {
        let end = match count {
            0 => start,
            _ => start + (count - 1) * row_stride + row_len,
        };
        return (&direct[start..end], row_stride);
    }
    buf.clear();
    for r in 0..count {
        let row = start + r * row_stride;
        buf.extend(src[row..row + row_len].iter().map(|&x| C::of(x)));
    }
    (buf, row_len)
}
