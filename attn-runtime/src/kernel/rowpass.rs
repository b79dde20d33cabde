//! The fused pass over one row of logits: bias, mask, softmax (and, separately, dropout), with
//! the rounding points of Flax (FLAX_SEMANTICS.md §1 steps 6–10).
//!
//! Interface: the caller fills a row with the scaled logits `q·kᵀ` (already rounded to the
//! computation dtype) and calls [`RowPass::softmax`]; the row then holds the weights, rounded
//! to the weights dtype. [`RowPass::dropout`] applies dropout to such a row in place. Other
//! kernels (e.g. a tiled online-softmax path) can reuse [`RowPass::logit`] for the per-element
//! part.

use rand_core::RngCore;
use rand_pcg::Pcg32;

use super::broadcast::Row;
use super::plan::{DTypePlan, DropoutPlan};
use super::real::Real;
use crate::element::{DType, Element};

/// The mask of one row: causal limit and/or an explicit row of booleans.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskRow<'a> {
    /// Keys `j > limit` are masked (causal: `limit = i`).
    pub causal_limit: Option<usize>,
    /// `false` entries are masked.
    pub explicit: Option<Row<'a, bool>>,
}

impl MaskRow<'_> {
    /// No mask.
    #[cfg(test)]
    pub(crate) const NONE: MaskRow<'static> = MaskRow {
        causal_limit: None,
        explicit: None,
    };

    /// Whether key `j` is kept.
    #[inline(always)]
    pub(crate) fn keeps(&self, j: usize) -> bool {
        self.causal_limit.is_none_or(|l| j <= l) && self.explicit.is_none_or(|r| r.get(j))
    }

    /// Whether this row has any mask.
    #[inline(always)]
    pub(crate) fn is_some(&self) -> bool {
        self.causal_limit.is_some() || self.explicit.is_some()
    }
}

/// The constants of the row pass of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowPass<T> {
    logits: DType,
    softmax: DType,
    softmax_recip: DType,
    weights: DType,
    dropped: DType,
    big_neg: T,
}

impl<T: Real> RowPass<T> {
    /// The row pass for a dtype plan.
    pub(crate) fn new(plan: &DTypePlan) -> Self {
        RowPass {
            logits: plan.logits,
            softmax: plan.softmax,
            softmax_recip: DTypePlan::reciprocal_dtype(plan.softmax),
            weights: plan.weights,
            dropped: plan.dropped_weights,
            // `finfo(computation dtype).min`; every float dtype's min fits in f32 or f64.
            big_neg: T::from_f64(plan.compute.finfo_min().unwrap_or(f64::MIN)),
        }
    }

    /// One logit after bias and mask, in the softmax dtype: `x + bias` rounded to the logits
    /// dtype, replaced by `big_neg` where masked, then cast to the softmax dtype.
    #[inline(always)]
    pub(crate) fn logit<B: Element>(&self, x: T, bias: Option<B>, keep: bool) -> T {
        let x = match bias {
            Some(b) => (x + T::from_elem(b)).round_to(self.logits),
            None => x,
        };
        let x = if keep { x } else { self.big_neg };
        x.round_to(self.softmax)
    }

    /// Turns a row of logits into weights: bias, mask, then `jax.nn.softmax` with its rounding
    /// points (`x - max`, `exp`, the sum, `1/sum`, the product, each rounded to the softmax
    /// dtype; the sum of 16-bit values in f32), then the cast to the weights dtype.
    ///
    /// A fully masked row becomes uniform (every entry is `big_neg`). NaN in a row makes the
    /// row NaN, as in Flax.
    pub(crate) fn softmax<B: Element>(
        &self,
        row: &mut [T],
        bias: Option<Row<'_, B>>,
        mask: MaskRow<'_>,
    ) {
        // When rounding to the softmax dtype is the identity (an f32 softmax in f32, an f64
        // softmax in f64), the maximum and `exp` run as vectorized slice operations.
        let unrounded = match self.softmax {
            DType::F64 => true,
            DType::F32 => core::mem::size_of::<T>() == 4,
            _ => false,
        };
        let mut max = T::from_f64(f64::NEG_INFINITY);
        match (bias, mask.is_some()) {
            (None, false) if unrounded => max = T::max_of(row),
            (None, false) => {
                for x in row.iter_mut() {
                    *x = x.round_to(self.softmax);
                    if *x > max {
                        max = *x;
                    }
                }
            }
            _ => {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = self.logit(*x, bias.map(|b| b.get(j)), mask.keeps(j));
                    if *x > max {
                        max = *x;
                    }
                }
            }
        }
        let mut sum = T::ZERO;
        if unrounded {
            sum = T::exp_shift_sum(row, max);
        } else {
            for x in row.iter_mut() {
                let u = (*x - max)
                    .round_to(self.softmax)
                    .exp()
                    .round_to(self.softmax);
                *x = u;
                sum = sum + u;
            }
        }
        let scale = sum
            .round_to(self.softmax)
            .recip()
            .round_to(self.softmax_recip);
        if unrounded && self.weights == self.softmax {
            for x in row.iter_mut() {
                *x = *x * scale;
            }
        } else {
            for x in row.iter_mut() {
                *x = (*x * scale).round_to(self.softmax).round_to(self.weights);
            }
        }
    }

    /// Dropout on a row of weights: element `j` keeps its weight (times the multiplier,
    /// rounded to the dropped-weights dtype) when the `j`-th draw of `rng` is below the
    /// threshold, else becomes 0. `rng` must be positioned at the row's first logical index.
    pub(crate) fn dropout(&self, row: &mut [T], rng: &mut Pcg32, plan: &DropoutPlan) {
        let multiplier = T::from_f64(plan.multiplier);
        for x in row.iter_mut() {
            let draw = u64::from(rng.next_u32());
            *x = if draw < plan.threshold {
                (*x * multiplier).round_to(self.dropped)
            } else {
                T::ZERO
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn softmax_rows_and_masks() {
        let plan = DTypePlan::new(DType::F64, None, false, false);
        let pass = RowPass::<f64>::new(&plan);
        let mut row = vec![1.0, 2.0, 3.0];
        pass.softmax::<f64>(&mut row, None, MaskRow::NONE);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0]
            .iter()
            .map(|x| (x - 3.0f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        for (w, e) in row.iter().zip(&e) {
            assert!((w - e / s).abs() < 1e-15);
        }
        let mut row = vec![1.0, 2.0, 3.0];
        let mask = MaskRow {
            causal_limit: Some(0),
            explicit: None,
        };
        pass.softmax::<f64>(&mut row, None, mask);
        assert_eq!(row, vec![1.0, 0.0, 0.0]);
        let keep = [false, false, false];
        let mut row = vec![5.0, -1.0, 7.0];
        let mask = MaskRow {
            causal_limit: None,
            explicit: Some(Row::Values(&keep)),
        };
        pass.softmax::<f64>(&mut row, None, mask);
        assert!(
            row.iter().all(|&w| (w - 1.0 / 3.0).abs() < 1e-16),
            "{row:?}"
        );
    }

    #[test]
    fn f16_fully_masked_row_rounds_to_f16() {
        let plan = DTypePlan::new(DType::F16, None, false, false);
        let pass = RowPass::<f32>::new(&plan);
        let keep = [false; 6];
        let mut row = vec![0.5f32; 6];
        let mask = MaskRow {
            causal_limit: None,
            explicit: Some(Row::Values(&keep)),
        };
        pass.softmax::<bf16>(&mut row, None, mask);
        // FLAX_SEMANTICS.md §1 step 8: 0.16662598 for k = 6.
        assert!(row.iter().all(|&w| w == 0.16662598), "{row:?}");
    }
}
