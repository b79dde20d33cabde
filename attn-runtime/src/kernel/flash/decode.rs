//! The decode path: a task of a single query row (a decoding step) over all its heads. Its
//! products are matrix–vector products, bound by reading K and V, so keys and values are read
//! row by row in memory order (all heads of a row are contiguous), four heads' logits at a
//! time ([`Dot::dot4`](super::super::dot::Dot::dot4)), instead of through the tile products of
//! `block.rs`.

use std::ops::Range;

use super::super::dot::dot;
use super::super::exp::MulAdd;
use super::super::isa;
use super::args::FlashArgs;
use super::dims::{KEY_BLOCK, Rows};
use super::pack::rows_as;
use super::scratch::Scratch;
use super::softmax::{Running, softmax_block};
use super::tile::TileReal;
use crate::element::Element;

/// Folds key block `block` (keys `j0..`) into the running state of every head, for a task of a
/// single query row. The products are matrix–vector products, bound by reading K and V, so
/// keys and values are read row by row (all heads of a row are contiguous) in memory order.
#[inline(always)]
pub(super) fn single_row_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    keys_range: Range<usize>,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let (depth, v_depth) = (d.qk_depth, d.v_depth);
    let task_heads = rows.heads();
    let (j0, cols) = (keys_range.start, keys_range.len());
    // Row stride of `scores` (heads × keys here); the scratch holds `min(KEY_BLOCK, kv_len)` rows
    // of at least `heads` columns.
    let stride = KEY_BLOCK.min(d.kv_len);
    let Scratch {
        query_t,
        acc,
        max,
        sum,
        skipped,
        scores,
        alpha,
        shift,
        block_max,
        keys,
        values,
        keep,
        active,
        pairs: _,
    } = s;

    active.fill(true);
    if let Some(mask) = &args.mask.explicit {
        keep.clear();
        for h in task_heads.clone() {
            let row = mask.row(rows.b, h, rows.first);
            let start = keep.len();
            keep.extend((0..cols).map(|jj| row.get(j0 + jj)));
            if !keep[start..].contains(&true) {
                skipped[h].push(keys_range.clone());
                active[h] = false;
            }
        }
        if !active[task_heads.clone()].contains(&true) {
            return;
        }
    }

    // Logits of every head, key row by key row: scores[h][jj].
    // Four heads at a time (independent sums, each in the order of `dot`: the same bits);
    // inactive heads' logits are computed and never read.
    let key_row_len = d.kv_heads * depth;
    let (quads, rest) = (task_heads.len() / 4, task_heads.len() % 4);
    for jj in 0..cols {
        let start = (rows.b * d.kv_len + j0 + jj) * key_row_len;
        prefetch_row(args.key, start + PREFETCH_ROWS * key_row_len, key_row_len);
        let (key_row, _) = rows_as(args.key, start, key_row_len, key_row_len, 1, keys);
        let query = |h: usize| &query_t[h * depth..(h + 1) * depth];
        let key = |h: usize| {
            let g = d.kv_head(h);
            &key_row[g * depth..(g + 1) * depth]
        };
        for quad in 0..quads {
            let h = rows.first_head + 4 * quad;
            let heads = [h, h + 1, h + 2, h + 3];
            let logits = C::dot4(heads.map(query), heads.map(key));
            for (h, x) in heads.into_iter().zip(logits) {
                scores[h * stride + jj] = x;
            }
        }
        for h in task_heads.end - rest..task_heads.end {
            if active[h] {
                scores[h * stride + jj] = dot(query(h), key(h));
            }
        }
    }

    for h in task_heads.clone() {
        if active[h] {
            let keep_h = if args.mask.explicit.is_none() {
                &[][..]
            } else {
                &keep[(h - rows.first_head) * cols..][..cols]
            };
            softmax_block::<C, E, M>(
                args,
                (rows, h, j0, cols),
                &mut scores[h * stride..h * stride + cols],
                keep_h,
                Running {
                    max: &mut max[h..h + 1],
                    sum: &mut sum[h..h + 1],
                    acc: &mut acc[h * v_depth..(h + 1) * v_depth],
                },
                (&mut alpha[..1], &mut shift[..1], &mut block_max[..1]),
            );
        }
    }

    // acc[h] += Σ_jj p[h][jj] · V[j0 + jj][h], value row by value row.
    let value_row_len = d.kv_heads * v_depth;
    for jj in 0..cols {
        let start = (rows.b * d.kv_len + j0 + jj) * value_row_len;
        prefetch_row(
            args.value,
            start + PREFETCH_ROWS * value_row_len,
            value_row_len,
        );
        let (value_row, _) = rows_as(args.value, start, value_row_len, value_row_len, 1, values);
        for h in task_heads.clone() {
            if active[h] {
                let p = scores[h * stride + jj];
                let g = d.kv_head(h);
                let v = &value_row[g * v_depth..(g + 1) * v_depth];
                for (a, &v) in acc[h * v_depth..(h + 1) * v_depth].iter_mut().zip(v) {
                    *a = *a + p * v;
                }
            }
        }
    }
}

/// How many rows ahead of its reads the decode path asks for key and value rows.
const PREFETCH_ROWS: usize = 4;

/// Prefetches `data[start..start + len]`, or what of it lies inside `data` (a hint: no effect
/// on any result), for rows of 32- and 64-bit elements, which the decode path reads in place.
/// Measured on a Zen 4 (B=8, H=8, kv=4096, D=128, 2 threads, medians): f32 rows 14.7 → 12.6
/// ms with 4 rows (16 KiB) ahead, within 0.5 ms for 1 to 8 rows; bf16 rows, which are widened
/// into a scratch row first, got slower at every distance tried (7.0 → 8.9 ms), so they are
/// not prefetched.
#[inline(always)]
fn prefetch_row<E>(data: &[E], start: usize, len: usize) {
    if std::mem::size_of::<E>() < 4 {
        return;
    }
    if let Some(row) = data.get(start..start.saturating_add(len)) {
        isa::prefetch(row);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn decode_single_query_row() {
        let d = dims(3, 1, 1000, 4, 128, 128);
        let x = inputs::<f32>(&d, 6);
        check::<f32, f32>(&args::<f32>(d, &x), 1e-6, 1e-5);
        // One batch element: its heads are split into groups of 2, 2 and 1 (3 tasks).
        let d = dims(1, 1, 300, 5, 16, 8);
        let x = inputs::<f32>(&d, 16);
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        check::<f32, f32>(&a, 1e-6, 1e-5);
        a.mask.vis = Visibility::default();
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn single_rows_with_bias_masks_and_dropout() {
        // q_len 1 takes the memory-streaming path; short and long kv, per-head bias and mask,
        // a head whose mask is all false (uniform weights), dropout.
        for kv in [5, 300, 700] {
            let d = dims(3, 1, kv, 4, 16, 8);
            let x = inputs::<f32>(&d, 13);
            let bias_data: Vec<f32> = data(4 * kv, 14, 2.0).iter().map(|&v| v as f32).collect();
            let keep: Vec<bool> = (0..3 * 4 * kv)
                .map(|n| n / kv % 4 != 2 && (n % 7 != 3 || (n / kv) % 4 == 1))
                .map(|k| k || kv == 5)
                .collect();
            let bias = resolved(&bias_data, &[4, 1, kv], &[3], 4, 1, kv).unwrap();
            let mask = resolved(&keep, &[3, 4, 1, kv], &[3], 4, 1, kv).unwrap();
            let mut a = args::<f32>(d, &x);
            a.bias = Some(&bias);
            a.mask.explicit = Some(mask);
            if kv == 5 {
                a.mask.vis = causal(&a.dims);
            }
            a.dropout = Some(FlashDropout {
                rng: Pcg32::new(7, 0),
                threshold: (0.6 * 2f64.powi(32)) as u64,
                multiplier: (1.0f32 / 0.6) as f64,
                broadcast: false,
            });
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }
}
