//! The dtype plan of one call: which dtype each of Flax's steps produces, and so where the
//! kernels round (FLAX_SEMANTICS.md §1 steps 2–10, §2 step 5).

use crate::element::DType;
use crate::error::AttnError;

/// The dtypes Flax produces at each step of an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DTypePlan {
    /// The computation dtype (after `promote_dtype`): query, key and value are in it.
    pub compute: DType,
    /// The logits after the bias add (`promote(compute, bias)`).
    pub logits: DType,
    /// The dtype the softmax runs in.
    pub softmax: DType,
    /// The weights after the softmax (what is sown).
    pub weights: DType,
    /// The weights after dropout (what `dot_product_attention_weights` returns): `weights`
    /// without dropout, `promote(weights, compute)` with dropout active.
    pub dropped_weights: DType,
    /// The output of `dot_product_attention`: `promote(weights, compute)`.
    pub output: DType,
}

impl DTypePlan {
    /// The plan for inputs of dtype `compute`, a bias of dtype `bias` (if any), the
    /// `force_fp32_for_softmax` flag and whether dropout is active.
    pub fn new(
        compute: DType,
        bias: Option<DType>,
        force_fp32_for_softmax: bool,
        dropout_active: bool,
    ) -> Self {
        let logits = bias.map_or(compute, |b| compute.promote(b));
        let forced = force_fp32_for_softmax && compute != DType::F32;
        let softmax = if forced { DType::F32 } else { logits };
        let weights = if forced { DType::F32 } else { compute };
        let output = weights.promote(compute);
        let dropped_weights = if dropout_active { output } else { weights };
        DTypePlan {
            compute,
            logits,
            softmax,
            weights,
            dropped_weights,
            output,
        }
    }

    /// The dtype arithmetic runs in: f64 when any step is f64, else f32 (bf16/f16 steps are
    /// emulated in f32 with rounding at Flax's rounding points).
    pub(crate) fn accumulate_f64(&self) -> bool {
        self.compute == DType::F64 || self.logits == DType::F64
    }

    /// `R` of FLAX_SEMANTICS §1 step 4: the dtype a reciprocal is rounded to before XLA
    /// multiplies by it (f32 for bf16, whose elementwise math runs in f32 on CPU).
    pub(crate) fn reciprocal_dtype(dtype: DType) -> DType {
        if dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        }
    }

    /// The factor the query is multiplied by: `round_R(1 / round_compute(sqrt(depth)))`, or the
    /// caller's `scale` rounded to the computation dtype.
    pub(crate) fn query_scale(&self, depth: usize, scale: Option<f64>) -> f64 {
        match scale {
            Some(s) => self.compute.round_f64(s),
            None => {
                let divisor = self.compute.round_f64((depth as f64).sqrt());
                Self::reciprocal_dtype(self.compute).round_f64(1.0 / divisor)
            }
        }
    }
}

/// Dropout of one call, when active.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropoutPlan {
    /// A draw `x` (uniform `u32`) keeps the element when `x < threshold`.
    pub threshold: u64,
    /// The factor kept weights are multiplied by: `1 / keep_prob` in the computation dtype
    /// (0 when nothing is kept).
    pub multiplier: f64,
    /// Whether one mask `[q, kv]` is shared by all batch elements and heads.
    pub broadcast: bool,
}

impl DropoutPlan {
    /// Validates the rate and returns the plan, `None` when dropout is off (`deterministic`
    /// or rate 0).
    pub(crate) fn new(
        rate: f64,
        broadcast: bool,
        deterministic: bool,
        have_rng: bool,
        compute: DType,
    ) -> Result<Option<Self>, AttnError> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(AttnError::DropoutRate { rate });
        }
        if deterministic || rate == 0.0 {
            return Ok(None);
        }
        if !have_rng {
            return Err(AttnError::MissingDropoutRng { rate });
        }
        let keep = 1.0 - rate;
        let threshold = (keep * 4_294_967_296.0).round() as u64;
        // `keep.astype(dtype) / jnp.asarray(keep_prob, dtype)`: the reciprocal of the rounded
        // keep probability, rounded as XLA does; rate 1 keeps nothing and scales by 0 (Flax
        // computes 0/0 = NaN here).
        let keep_c = compute.round_f64(keep);
        let multiplier = if keep_c == 0.0 {
            0.0
        } else {
            let r = DTypePlan::reciprocal_dtype(compute).round_f64(1.0 / keep_c);
            compute.round_f64(r)
        };
        Ok(Some(DropoutPlan {
            threshold,
            multiplier,
            broadcast,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DType::*;

    #[test]
    fn dtype_table_of_flax_semantics() {
        // FLAX_SEMANTICS.md "Dtype summary".
        let p = DTypePlan::new(BF16, Some(F32), false, false);
        assert_eq!(
            (p.logits, p.softmax, p.weights, p.output),
            (F32, F32, BF16, BF16)
        );
        let p = DTypePlan::new(F16, None, true, false);
        assert_eq!((p.softmax, p.weights, p.output), (F32, F32, F32));
        let p = DTypePlan::new(F64, None, true, false);
        assert_eq!((p.softmax, p.weights, p.output), (F32, F32, F64));
        let p = DTypePlan::new(F64, None, true, true);
        assert_eq!(p.dropped_weights, F64);
        let p = DTypePlan::new(F32, None, true, false);
        assert_eq!((p.softmax, p.weights), (F32, F32));
    }

    #[test]
    fn query_scale_rounds_like_xla() {
        // bf16 sqrt(3) = 1.734375; f16 sqrt(8) = 2.828125.
        let p = DTypePlan::new(BF16, None, false, false);
        assert_eq!(p.query_scale(3, None), (1.0f64 / 1.734375) as f32 as f64);
        let p = DTypePlan::new(F16, None, false, false);
        assert_eq!(p.query_scale(8, None), F16.round_f64(1.0 / 2.828125));
    }

    #[test]
    fn dropout_multiplier_in_computation_dtype() {
        let d = DropoutPlan::new(0.1, true, false, true, BF16)
            .unwrap()
            .unwrap();
        assert_eq!(d.multiplier, 1.109375);
        let d = DropoutPlan::new(0.25, true, false, true, F32)
            .unwrap()
            .unwrap();
        assert_eq!(d.multiplier, (1.0f32 / 0.75f32) as f64);
        assert!(DropoutPlan::new(f64::NAN, true, true, false, F32).is_err());
        assert!(DropoutPlan::new(1.5, true, true, false, F32).is_err());
        assert!(
            DropoutPlan::new(0.5, true, true, false, F32)
                .unwrap()
                .is_none()
        );
        assert!(DropoutPlan::new(0.5, true, false, false, F32).is_err());
    }
}
