//! The online softmax of one head: its running state (maximum, sum and output accumulator per
//! query row, reset by [`start_head`]), the fold of one block of logits into it
//! ([`softmax_block`]: bias, masks, new maxima, `exp`, sums, dropout, rescaling, with the column
//! passes held in registers), and the completion of rows that a mask hid entirely
//! ([`add_back_skipped_keys`]: Flax's uniform weights over every key, skipped blocks included).

use super::super::exp::MulAdd;
use super::args::FlashArgs;
use super::dims::Rows;
use super::mask::mask_structured;
use super::scratch::Scratch;
use super::tile::TileReal;
use crate::element::Element;

/// Resets the running state of head `h`.
#[inline(always)]
pub(super) fn start_head<C: TileReal, E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let width = rows.width;
    s.max[h * width..(h + 1) * width].fill(C::NEG_INFINITY);
    s.sum[h * width..(h + 1) * width].fill(C::ZERO);
    let per_head = rows.count * d.v_depth;
    s.acc[h * per_head..(h + 1) * per_head].fill(C::ZERO);
    s.skipped[h].clear();
}

/// The running state of one head: per query row the maximum and sum, and the accumulator
/// `[rows][v_depth]`.
pub(super) struct Running<'s, C> {
    /// Running maximum per query row.
    pub(super) max: &'s mut [C],
    /// Running sum per query row.
    pub(super) sum: &'s mut [C],
    /// Accumulator `[rows][v_depth]`.
    pub(super) acc: &'s mut [C],
}

/// Adds bias and masks to the transposed logits `scores` (`[cols][width]`, `width` query
/// columns of which `rows.count` are real), turns them into probabilities relative to the
/// updated running maximum, adds them to the running sum, applies dropout and rescales the
/// accumulator. `keep` is the explicit mask of the block (`[cols][rows.count]`), if any.
#[inline(always)]
pub(super) fn softmax_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    (rows, h, j0, cols): (Rows, usize, usize, usize),
    scores: &mut [C],
    keep: &[bool],
    state: Running<'_, C>,
    (alpha, shift, block_max): (&mut [C], &mut [C], &mut [C]),
) {
    let d = args.dims;
    let (width, b) = (rows.width, rows.b);
    let big_neg = C::from_f64(args.big_neg);
    let Running { max, sum, acc } = state;
    // Bias, then masks (a masked logit is replaced, whatever the bias).
    if let Some(bias) = &args.bias {
        for r in 0..rows.count {
            C::add_bias(
                *bias,
                (b, h, rows.first + r),
                j0,
                cols,
                &mut scores[r..],
                width,
            );
        }
    }
    let vis = &args.mask.vis;
    if vis.is_causal_only() {
        // Rows before `j0 + jj` have key `j0 + jj` in their future.
        if j0 + cols - 1 > rows.first {
            for jj in 0..cols {
                let masked_rows = (j0 + jj).saturating_sub(rows.first).min(rows.count);
                scores[jj * width..jj * width + masked_rows].fill(big_neg);
            }
        }
    } else if !vis.is_trivial() {
        mask_structured(vis, (rows, j0, cols), scores, big_neg);
    }
    if !keep.is_empty() {
        for jj in 0..cols {
            for r in 0..rows.count {
                if !keep[jj * rows.count + r] {
                    scores[jj * width + r] = big_neg;
                }
            }
        }
    }

    // Online softmax, vectorized along the query columns.
    let block_max = &mut block_max[..width];
    block_max.fill(C::NEG_INFINITY);
    column_max(scores, width, block_max);
    for r in 0..width {
        let new_max = max[r].max(block_max[r]);
        // A row whose logits so far are all -inf keeps shift 0, so that exp(-inf) = 0
        // instead of exp(-inf - -inf) = NaN.
        let row_shift = if new_max == C::NEG_INFINITY {
            C::ZERO
        } else {
            new_max
        };
        alpha[r] = (max[r] - row_shift).exp::<M>();
        shift[r] = row_shift;
        max[r] = new_max;
        sum[r] = sum[r] * alpha[r];
    }
    exp_and_column_sum::<C, M>(scores, width, &shift[..width], sum);
    if let Some(dropout) = &args.dropout {
        for r in 0..rows.count {
            dropout.for_run::<C>(&d, (b, h, rows.first + r), j0, cols, |jj, keep| {
                let x = &mut scores[jj * width + r];
                *x = *x * keep;
            });
        }
    }
    for (acc_row, &a) in acc.chunks_exact_mut(d.v_depth).zip(alpha.iter()) {
        if a != C::ONE {
            for x in acc_row {
                *x = *x * a;
            }
        }
    }
}

/// Columns that the column passes below hold in registers across all rows of a block (four
/// AVX-512 vectors of `f32`). A pass that went through memory row by row would make every row
/// wait for the previous row's store of the same maxima or sums.
const REGISTER_COLUMNS: usize = 64;
/// The columns of narrower blocks (16-row tasks of short sequences, the widths are multiples
/// of 16): one vector of `f32` at a time, still across all rows.
const VECTOR_COLUMNS: usize = 16;

/// The column chunks `(first column, columns)` of a block `width` columns wide that the column
/// passes take one at a time: [`REGISTER_COLUMNS`] while they fit, then [`VECTOR_COLUMNS`],
/// then single columns (a decoding task's one column).
#[inline(always)]
fn column_chunks(width: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut c0 = 0;
    std::iter::from_fn(move || {
        let n = [REGISTER_COLUMNS, VECTOR_COLUMNS, 1]
            .into_iter()
            .find(|&n| c0 + n <= width)?;
        c0 += n;
        Some((c0 - n, n))
    })
}

/// `max[c] = max(max[c], scores[j][c])` over the rows `j` of `scores` (`width` columns each).
#[inline(always)]
fn column_max<C: TileReal>(scores: &[C], width: usize, max: &mut [C]) {
    #[inline(always)]
    fn columns<C: TileReal, const N: usize>(scores: &[C], width: usize, c0: usize, max: &mut [C]) {
        let mut m: [C; N] = max[c0..c0 + N].try_into().expect("N columns");
        for row in scores.chunks_exact(width) {
            for (m, &x) in m.iter_mut().zip(&row[c0..c0 + N]) {
                *m = m.max(x);
            }
        }
        max[c0..c0 + N].copy_from_slice(&m);
    }
    for (c0, n) in column_chunks(width) {
        match n {
            REGISTER_COLUMNS => columns::<C, REGISTER_COLUMNS>(scores, width, c0, max),
            VECTOR_COLUMNS => columns::<C, VECTOR_COLUMNS>(scores, width, c0, max),
            _ => columns::<C, 1>(scores, width, c0, max),
        }
    }
}

/// `scores[j][c] = exp(scores[j][c] - shift[c])` and `sum[c] += scores[j][c]` over the rows `j`
/// of `scores` in order (`width` columns each).
#[inline(always)]
fn exp_and_column_sum<C: TileReal, M: MulAdd>(
    scores: &mut [C],
    width: usize,
    shift: &[C],
    sum: &mut [C],
) {
    #[inline(always)]
    fn columns<C: TileReal, M: MulAdd, const N: usize>(
        scores: &mut [C],
        width: usize,
        c0: usize,
        shift: &[C],
        sum: &mut [C],
    ) {
        let shift: [C; N] = shift[c0..c0 + N].try_into().expect("N columns");
        let mut l: [C; N] = sum[c0..c0 + N].try_into().expect("N columns");
        for row in scores.chunks_exact_mut(width) {
            for ((x, &m), l) in row[c0..c0 + N].iter_mut().zip(&shift).zip(&mut l) {
                let p = (*x - m).exp::<M>();
                *x = p;
                *l = *l + p;
            }
        }
        sum[c0..c0 + N].copy_from_slice(&l);
    }
    for (c0, n) in column_chunks(width) {
        match n {
            REGISTER_COLUMNS => columns::<C, M, REGISTER_COLUMNS>(scores, width, c0, shift, sum),
            VECTOR_COLUMNS => columns::<C, M, VECTOR_COLUMNS>(scores, width, c0, shift, sum),
            _ => columns::<C, M, 1>(scores, width, c0, shift, sum),
        }
    }
}

/// Rows of head `h` whose every logit was masked (their maximum is `big_neg`, or −∞ when all
/// the logits that were computed are −∞) get weight `exp(big_neg - big_neg) = 1` on every key,
/// including the keys of skipped blocks, which are all masked. The computed part is already in
/// the accumulator and the sum; this adds the skipped keys.
#[inline(never)]
#[cold]
pub(super) fn add_back_skipped_keys<C: TileReal, E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let v_depth = d.v_depth;
    let big_neg = C::from_f64(args.big_neg);
    for r in 0..rows.count {
        let max = &mut s.max[h * rows.width + r];
        let fully_masked = *max <= big_neg;
        if !fully_masked {
            continue;
        }
        // With a maximum of -inf everything computed had weight 0; the masked keys now hold it.
        *max = big_neg;
        for range in &s.skipped[h] {
            let (j0, cols) = (range.start, range.len());
            let mut weights = vec![C::ONE; cols];
            if let Some(dropout) = &args.dropout {
                dropout.for_run::<C>(&d, (rows.b, h, rows.first + r), j0, cols, |jj, keep| {
                    weights[jj] = keep;
                });
            }
            let sum = &mut s.sum[h * rows.width + r];
            *sum = *sum + C::from_f64(cols as f64);
            let acc_row = &mut s.acc[(h * rows.count + r) * v_depth..][..v_depth];
            for (jj, &w) in weights.iter().enumerate() {
                let start = ((rows.b * d.kv_len + j0 + jj) * d.kv_heads + d.kv_head(h)) * v_depth;
                for (a, &v) in acc_row.iter_mut().zip(&args.value[start..start + v_depth]) {
                    *a = *a + w * C::of(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn fully_masked_rows_average_all_values_even_with_skipped_blocks() {
        // Causal + a query-padding mask that removes rows 3 and 500 entirely: Flax gives
        // those rows the mean of all value rows, including keys in skipped blocks.
        let (q, k) = (520, 700);
        let d = dims(1, q, k, 2, 8, 5);
        let x = inputs::<f32>(&d, 4);
        let keep: Vec<bool> = (0..q).map(|i| i != 3 && i != 500).collect();
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        a.mask.explicit = resolved(&keep, &[q, 1], &[1], 2, q, k);
        assert!(a.mask.explicit.is_some());
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn rows_with_only_infinite_logits_are_nan_like_flax() {
        let d = dims(1, 2, 20, 1, 4, 3);
        let x = inputs::<f32>(&d, 10);
        // Row 0: every bias -inf -> NaN. Row 1: one finite entry -> that value row.
        let mut bias = vec![f32::NEG_INFINITY; 40];
        bias[20 + 7] = 0.0;
        let mut a = args::<f32>(d, &x);
        let bias = resolved(&bias, &[2, 20], &[1], 1, 2, 20).unwrap();
        a.bias = Some(&bias);
        let mut got = vec![0.0f32; 6];
        flash_attention(&a, &mut got, None, Isa::detect(), Threads(None)).unwrap();
        assert!(got[..3].iter().all(|x| x.is_nan()), "{got:?}");
        let v7 = &x.value[7 * 3..8 * 3];
        assert_eq!(&got[3..], v7);
    }
}
