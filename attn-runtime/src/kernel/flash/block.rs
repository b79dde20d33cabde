//! One block of keys against the query rows of a task, per head, on the tile products:
//! the explicit mask's class on the block (skip it, ignore the mask, or read it),
//! `Sᵀ = K_blk · Q_blkᵀ` (in `f32`/`f64`, or on `bf16` pairs), the online softmax of the block
//! (`softmax.rs`) and `O += P · V_blk` (with the probabilities rounded to `bf16` where Flax
//! rounds the weights).

use std::ops::Range;

use super::super::exp::MulAdd;
use super::super::isa::{self, Isa, Product};
use super::super::round::bf16_bits;
use super::args::FlashArgs;
use super::dims::Rows;
use super::mask_blocks::BlockClass;
use super::pack::{pack_bf16_pairs, pair, rows_as};
use super::scratch::Scratch;
use super::softmax::{Running, softmax_block};
use super::tile::TileReal;
use crate::element::Element;

/// Folds key block `block` (keys `j0..`) into the running state of head `h`.
#[inline(always)]
pub(super) fn key_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    keys_range: Range<usize>,
    s: &mut Scratch<C>,
    (isa, bf16_pairs): (Isa, bool),
) {
    let d = args.dims;
    let (depth, v_depth, width, b) = (d.qk_depth, d.v_depth, rows.width, rows.b);
    let (j0, cols) = (keys_range.start, keys_range.len());
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
        active: _,
        pairs,
    } = s;

    // An explicit mask that is false on the whole block removes it; one that is true on the
    // whole block is not read (`keep` stays empty).
    keep.clear();
    if let Some(mask) = &args.mask.explicit {
        let class = args.mask.explicit_blocks.as_ref().map(|blocks| {
            let rows = rows.first..rows.first + rows.count;
            blocks.classify(mask, (b, h, rows), keys_range.clone())
        });
        match class {
            Some(BlockClass::Hidden) => {
                skipped[h].push(keys_range);
                return;
            }
            Some(BlockClass::Visible) => {}
            Some(BlockClass::Mixed) | None => {
                keep.resize(cols * rows.count, false);
                let mut any = false;
                for r in 0..rows.count {
                    let row = mask.row(b, h, rows.first + r);
                    for jj in 0..cols {
                        let k = row.get(j0 + jj);
                        any |= k;
                        keep[jj * rows.count + r] = k;
                    }
                }
                if !any {
                    skipped[h].push(keys_range);
                    return;
                }
            }
        }
    }

    // Sᵀ = K_blk · Q_blkᵀ.
    let g = d.kv_head(h);
    let kv_rows = d.kv_heads * depth;
    let key_start = ((b * d.kv_len + j0) * d.kv_heads + g) * depth;
    let scores = &mut scores[..cols * width];
    if bf16_pairs {
        let half_depth = depth.div_ceil(2);
        let key_bits = E::as_bf16_bits(args.key).unwrap_or_default();
        // With an even depth the keys are already pairs in memory; else pack them, padded.
        let (key_pairs, key_row) = match isa::as_u32_pairs(key_bits) {
            Some(all) if depth.is_multiple_of(2) => (&all[key_start / 2..], kv_rows / 2),
            _ => {
                pairs.key.resize(cols * half_depth, 0);
                for (jj, packed) in pairs.key.chunks_exact_mut(half_depth).enumerate() {
                    let row = &key_bits[key_start + jj * kv_rows..][..depth];
                    pack_bf16_pairs(row, packed);
                }
                (&pairs.key[..], half_depth)
            }
        };
        C::product_bf16_pairs(
            &Product {
                a: key_pairs,
                a_row: key_row,
                a_step: 1,
                b: &pairs.query[h * half_depth * width..(h + 1) * half_depth * width],
                b_step: width,
                rows: cols,
                cols: width,
                depth: half_depth,
                accumulate: false,
                scale: 1.0,
            },
            scores,
            width,
        );
    } else {
        let (key_data, key_row) = rows_as(args.key, key_start, kv_rows, depth, cols, keys);
        C::product(
            isa,
            &Product {
                a: key_data,
                a_row: key_row,
                a_step: 1,
                b: &query_t[h * depth * width..(h + 1) * depth * width],
                b_step: width,
                rows: cols,
                cols: width,
                depth,
                accumulate: false,
                scale: 1.0,
            },
            scores,
            width,
        );
    }

    let per_head = rows.count * v_depth;
    softmax_block::<C, E, M>(
        args,
        (rows, h, j0, cols),
        scores,
        keep,
        Running {
            max: &mut max[h * width..(h + 1) * width],
            sum: &mut sum[h * width..(h + 1) * width],
            acc: &mut acc[h * per_head..(h + 1) * per_head],
        },
        (alpha, shift, block_max),
    );
    let acc = &mut acc[h * per_head..(h + 1) * per_head];

    // O += P · V_blk.
    let kv_values = d.kv_heads * v_depth;
    let value_start = ((b * d.kv_len + j0) * d.kv_heads + g) * v_depth;
    if bf16_pairs && args.weights_bf16 {
        let half_cols = cols.div_ceil(2);
        let value_bits = E::as_bf16_bits(args.value).unwrap_or_default();
        let key_bits = E::as_bf16_bits(args.key).unwrap_or_default();
        pairs.probs.resize(half_cols * width, 0);
        pairs.value.resize(half_cols * v_depth, 0);
        let probs = pairs.probs.chunks_exact_mut(width);
        let values = pairs.value.chunks_exact_mut(v_depth);
        for (t, (probs, values)) in probs.zip(values).enumerate() {
            let (lo, hi) = (2 * t, 2 * t + 1);
            let bits = |p: C| u32::from(bf16_bits(p.to::<f32>()));
            let value_row = |j: usize| &value_bits[value_start + j * kv_values..][..v_depth];
            if hi < cols {
                let (p_lo, p_hi) = (
                    &scores[lo * width..][..width],
                    &scores[hi * width..][..width],
                );
                for ((out, &a), &b) in probs.iter_mut().zip(p_lo).zip(p_hi) {
                    *out = pair(bits(a), bits(b));
                }
                for ((out, &a), &b) in values.iter_mut().zip(value_row(lo)).zip(value_row(hi)) {
                    *out = pair(a.into(), b.into());
                }
                // The next head's rows of this block, while this head's wait on memory: its
                // keys and values are read next, right after the product below.
                if h + 1 < d.heads && d.kv_head(h + 1) != g {
                    for j in [lo, hi] {
                        let next_value = value_start + v_depth + j * kv_values;
                        isa::prefetch(&value_bits[next_value..][..v_depth]);
                        isa::prefetch(&key_bits[key_start + depth + j * kv_rows..][..depth]);
                    }
                }
            } else {
                for (out, &a) in probs.iter_mut().zip(&scores[lo * width..][..width]) {
                    *out = bits(a);
                }
                for (out, &a) in values.iter_mut().zip(value_row(lo)) {
                    *out = a.into();
                }
            }
        }
        C::product_bf16_pairs(
            &Product {
                a: &pairs.probs,
                a_row: 1,
                a_step: width,
                b: &pairs.value,
                b_step: v_depth,
                rows: rows.count,
                cols: v_depth,
                depth: half_cols,
                accumulate: true,
                scale: 1.0,
            },
            acc,
            v_depth,
        );
        return;
    }
    let (value_data, value_row) =
        rows_as(args.value, value_start, kv_values, v_depth, cols, values);
    C::product(
        isa,
        &Product {
            a: scores,
            a_row: 1,
            a_step: width,
            b: value_data,
            b_step: value_row,
            rows: rows.count,
            cols: v_depth,
            depth: cols,
            accumulate: true,
            scale: 1.0,
        },
        acc,
        v_depth,
    );
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn bf16_inputs_with_f32_bias_and_f32_output() {
        let d = dims(2, 33, 70, 3, 16, 16);
        let x = inputs::<bf16>(&d, 7);
        let bias: Vec<f32> = data(70, 11, 1.0).iter().map(|&v| v as f32).collect();
        let mut a = args::<bf16>(d, &x);
        let bias = resolved(&bias, &[70], &[2], 3, 33, 70).unwrap();
        a.bias = Some(&bias);
        a.big_neg = bf16::MIN.to_f64();
        check::<bf16, f32>(&a, 1e-6, 1e-5);
        // bf16 output: one rounding to bf16 (relative error 2^-9).
        check::<bf16, bf16>(&a, 1e-6, 4e-3);
    }

    #[test]
    fn bf16_weights_rounded_before_the_value_product() {
        // Flax rounds bf16 weights before `P·V`; the bf16-pair products do too (the other
        // instruction sets keep them in f32). Each weight then carries a relative error of at
        // most 2^-9, so an output moves by at most 2^-9 · max|v| = 2^-9 · 2 (values in
        // [-2, 2)), plus 2^-9 relative for a bf16 output.
        // The second shape has an odd depth (a pair padded with zero), an odd number of keys
        // and a value depth that ends in a partial vector. Depths 64 and 1 have exact scales
        // (1/8, 1), so the scaled queries need no rounding.
        for d in [dims(2, 45, 300, 3, 64, 32), dims(1, 40, 77, 2, 1, 20)] {
            let x = inputs::<bf16>(&d, 9);
            let mut a = args::<bf16>(d, &x);
            a.weights_bf16 = true;
            a.big_neg = bf16::MIN.to_f64();
            let weights_bound = 2.0 * 2f64.powi(-9);
            check::<bf16, f32>(&a, weights_bound, 1e-5);
            check::<bf16, bf16>(&a, weights_bound, 2f64.powi(-9));
        }
    }
}
