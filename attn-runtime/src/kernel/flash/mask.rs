//! What hides or changes a logit: the bias behind a trait object ([`BiasRows`]), the mask
//! ([`FlashMask`]: the structured terms of [`Visibility`] and an explicit mask tensor with its
//! block summary [`MaskBlocks`]), the dropout of the weights ([`FlashDropout`]), and the
//! masking of one block of transposed logits by the structured terms ([`mask_structured`]).
//! It imports only the sizes (`dims.rs`), the mask summary (`mask_blocks.rs`) and the shared
//! arithmetic of the `isa` module, not the kernels that apply it.

use rand_core::RngCore;
use rand_pcg::Pcg32;

use super::super::broadcast::Resolved;
use super::super::isa::TileScalar;
use super::super::visibility::Visibility;
use super::dims::{Dims, Rows};
use super::mask_blocks::MaskBlocks;
use crate::element::Element;

/// A bias operand behind a trait object, so that the kernel body is compiled once per input
/// type rather than once per (input, bias) pair.
pub(crate) trait BiasRows: Sync {
    /// Adds `bias[b, h, i, j0 + n]` to `out[n · stride]` for `n < count`.
    fn add_f32(
        &self,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f32],
        stride: usize,
    );
    /// The same in `f64`.
    fn add_f64(
        &self,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f64],
        stride: usize,
    );
}

impl<B: Element> BiasRows for Resolved<'_, B> {
    fn add_f32(
        &self,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let row = self.row(b, h, i);
        for n in 0..count {
            out[n * stride] += row.get(j0 + n).to_f32();
        }
    }
    fn add_f64(
        &self,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f64],
        stride: usize,
    ) {
        let row = self.row(b, h, i);
        for n in 0..count {
            out[n * stride] += row.get(j0 + n).to_f64();
        }
    }
}

/// Which logits are masked (replaced by `big_neg`).
#[derive(Clone, Debug, Default)]
pub(crate) struct FlashMask<'a> {
    /// The structured terms (causal, window, lengths, segment ids).
    pub vis: Visibility<'a>,
    /// Keep only where this is true (ANDed with `vis`).
    pub explicit: Option<Resolved<'a, bool>>,
    /// The summary of `explicit` by blocks of keys, if built (see [`MaskBlocks`]); without
    /// it every block reads the mask.
    pub explicit_blocks: Option<MaskBlocks>,
}

impl FlashMask<'_> {
    /// Whether the visible keys move with the query row (causal or window, or a mask tensor
    /// that hides whole blocks of keys from some rows): smaller query blocks then skip more
    /// keys.
    pub(super) fn banded(&self) -> bool {
        self.vis.banded()
            || self
                .explicit_blocks
                .as_ref()
                .is_some_and(MaskBlocks::hides_chunks)
    }
}

/// Dropout of the softmax weights: the keep decision for weight `n` (row-major index over the
/// dropout shape) is `draw_n < threshold`, `draw_n` being the `n`-th `u32` of `rng`; kept
/// weights are multiplied by `multiplier`.
#[derive(Clone, Debug)]
pub(crate) struct FlashDropout {
    /// The generator at draw 0.
    pub rng: Pcg32,
    /// Keep when the draw is below this (`2³²` keeps everything).
    pub threshold: u64,
    /// `1 / keep_probability`, rounded as Flax does in the computation dtype.
    pub multiplier: f64,
    /// One mask shared by every batch element and head (Flax's `broadcast_dropout`).
    pub broadcast: bool,
}

impl FlashDropout {
    /// The keep multipliers (`multiplier` or 0) of weights `(b, h, i, j_start..j_start + n)`,
    /// passed to `apply(index_in_run, multiplier)`.
    #[inline(always)]
    pub(super) fn for_run<C: TileScalar>(
        &self,
        dims: &Dims,
        (b, h, i): (usize, usize, usize),
        j_start: usize,
        n: usize,
        mut apply: impl FnMut(usize, C),
    ) {
        let row = if self.broadcast {
            i
        } else {
            (b * dims.heads + h) * dims.q_len + i
        };
        let mut rng = self.rng.clone();
        rng.advance((row * dims.kv_len + j_start) as u64);
        let keep = C::from_f64(self.multiplier);
        for jj in 0..n {
            let kept = u64::from(rng.next_u32()) < self.threshold;
            apply(jj, if kept { keep } else { C::ZERO });
        }
    }
}

/// Replaces by `big_neg` the logits of `scores` (`[cols][width]`, keys `j0..j0 + cols`) that
/// the structured terms hide; rows whose visible range covers the block (and that have no
/// segment ids) are left as they are.
#[inline(always)]
pub(super) fn mask_structured<C: TileScalar>(
    vis: &Visibility<'_>,
    (rows, j0, cols): (Rows, usize, usize),
    scores: &mut [C],
    big_neg: C,
) {
    let width = rows.width;
    let block = j0..j0 + cols;
    // Packed sequences: most blocks lie inside one sequence. When every key of the block has
    // the same segment id, a row either shares it (only the other terms mask) or sees none of
    // the block: no id is compared per key.
    let block_segment = vis.segments(rows.b, rows.first).and_then(|(_, keys)| {
        let keys = &keys[block.clone()];
        keys.iter().all(|&k| k == keys[0]).then_some(keys[0])
    });
    for r in 0..rows.count {
        let i = rows.first + r;
        let range = vis.row_range(rows.b, i);
        let mut segment = vis.segments(rows.b, i);
        if let (Some((id, _)), Some(block_id)) = (segment, block_segment) {
            if id != block_id {
                for jj in 0..cols {
                    scores[jj * width + r] = big_neg;
                }
                continue;
            }
            segment = None;
        }
        if segment.is_none() && range.start <= block.start && block.end <= range.end {
            continue;
        }
        for jj in 0..cols {
            let j = j0 + jj;
            let kept = range.contains(&j) && segment.is_none_or(|(id, keys)| keys[j] == id);
            if !kept {
                scores[jj * width + r] = big_neg;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn mask_tensors_with_hidden_visible_and_mixed_blocks() {
        // Per batch element a different mask [2, 1, q, kv]: packed segments (block diagonal,
        // whole key blocks hidden, blocks entirely visible, edges mixed) and a causal mask
        // whose rows 0..40 are hidden entirely (uniform rows over skipped blocks).
        let (q, k) = (260, 300);
        let d = dims(2, q, k, 3, 16, 8);
        let x = inputs::<f32>(&d, 11);
        let segment = |n: usize| {
            [0..70, 70..200, 200..300]
                .iter()
                .position(|r| r.contains(&n))
        };
        let keep: Vec<bool> = (0..2 * q * k)
            .map(|n| {
                let (b, i, j) = (n / (q * k), n / k % q, n % k);
                if b == 0 {
                    segment(i) == segment(j)
                } else {
                    i >= 40 && j <= i
                }
            })
            .collect();
        let mut a = args::<f32>(d, &x);
        a.mask.explicit = resolved(&keep, &[2, 1, q, k], &[2], 3, q, k);
        check::<f32, f32>(&a, 1e-6, 1e-5);
        // With a causal structure on top (the summary and the structured range together).
        a.mask.vis = causal(&d);
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn causal_with_full_bias_matches() {
        let d = dims(1, 150, 150, 2, 64, 64);
        let x = inputs::<f32>(&d, 2);
        let bias_data: Vec<f32> = data(2 * 150 * 150, 9, 3.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut a = args::<f32>(d, &x);
        let bias = resolved(&bias_data, &[2, 150, 150], &[1], 2, 150, 150).unwrap();
        a.bias = Some(&bias);
        a.mask.vis = causal(&a.dims);
        assert!(a.bias.is_some());
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn grouped_heads_with_every_structured_term() {
        use crate::kernel::visibility::{Align, Mask, SegmentIds, Window};
        // 6 query heads reading 2 key/value heads; bottom-right causal, a window, lengths
        // (a padded query row and a batch element with 300 of 700 keys), segment ids.
        for (q, k) in [(150, 700), (1, 700), (37, 37)] {
            let mut d = dims(2, q, k, 6, 16, 8);
            d.kv_heads = 2;
            let x = inputs::<f32>(&d, 9);
            let ql = [q as i32, (q as i32 - 3).max(0)];
            let kl = [k as i32, (k as i32).min(300)];
            let qs: Vec<i32> = (0..2 * q)
                .map(|n| ((n % q) * 3 / q.max(1)) as i32)
                .collect();
            let ks: Vec<i32> = (0..2 * k).map(|n| ((n % k) * 3 / k) as i32).collect();
            let mask = Mask::none()
                .with_causal(Align::BottomRight)
                .with_window(Window {
                    left: 200,
                    right: 5,
                    align: Align::BottomRight,
                })
                .with_query_lengths(&ql)
                .with_kv_lengths(&kl)
                .with_segment_ids(SegmentIds {
                    query: &qs,
                    key: &ks,
                });
            let mut a = args::<f32>(d, &x);
            a.mask.vis = Visibility::new(&mask, 2, q, k).unwrap();
            check::<f32, f32>(&a, 1e-6, 1e-5);
            let mask = Mask::none()
                .with_window(Window {
                    left: 3,
                    right: 64,
                    align: Align::Offset(-50),
                })
                .with_kv_lengths(&kl);
            a.mask.vis = Visibility::new(&mask, 2, q, k).unwrap();
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }

    #[test]
    fn key_padding_skips_a_whole_block() {
        let (q, k) = (40, 800);
        let d = dims(2, q, k, 2, 16, 16);
        let x = inputs::<f32>(&d, 5);
        // Keys 256..512 (one whole block) and 700.. are padding in batch 0.
        let keep: Vec<bool> = (0..2 * k)
            .map(|n| n >= k || !((256..512).contains(&n) || n >= 700))
            .collect();
        let mut a = args::<f32>(d, &x);
        a.mask.explicit = resolved(&keep, &[2, 1, 1, k], &[2], 2, q, k);
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn dropout_uses_the_indexed_draws() {
        let d = dims(2, 70, 300, 2, 8, 8);
        let x = inputs::<f32>(&d, 9);
        for broadcast in [true, false] {
            let mut a = args::<f32>(d, &x);
            a.mask.vis = causal(&a.dims);
            a.dropout = Some(FlashDropout {
                rng: Pcg32::new(42, 0),
                threshold: (0.75 * 2f64.powi(32)) as u64,
                multiplier: (1.0f32 / 0.75) as f64,
                broadcast,
            });
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }
}
