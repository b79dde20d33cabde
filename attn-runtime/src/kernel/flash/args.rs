//! Everything one output-path call reads ([`FlashArgs`]): sizes, operands, scale, bias, mask,
//! dropout and the arithmetic to use, taken from a validated [`Call`]
//! ([`FlashArgs::of_call`], which also builds the mask tensor's block summary).

use super::super::call::Call;
use super::dims::Dims;
use super::mask::{BiasRows, FlashDropout, FlashMask};
use super::mask_blocks::MaskBlocks;
use crate::element::{DType, Element};
use crate::error::AttnError;

/// Everything one output-path call reads. Layouts are Flax's: query `[batch..., q, heads, d]`,
/// key `[batch..., kv, heads, d]`, value `[batch..., kv, heads, dv]`.
pub(crate) struct FlashArgs<'a, E> {
    /// Sizes.
    pub dims: Dims,
    /// Queries.
    pub query: &'a [E],
    /// Keys.
    pub key: &'a [E],
    /// Values.
    pub value: &'a [E],
    /// Queries are multiplied by this before the dot product (Flax: `1 / round(sqrt(d))`).
    pub query_scale: f64,
    /// Added to the logits.
    pub bias: Option<&'a dyn BiasRows>,
    /// Masked logits.
    pub mask: FlashMask<'a>,
    /// What a masked logit becomes: `finfo(computation dtype).min`.
    pub big_neg: f64,
    /// Dropout of the weights, if active.
    pub dropout: Option<FlashDropout>,
    /// Compute in `f64` (some step of Flax's is `f64`) rather than `f32`.
    pub accumulate_f64: bool,
    /// Flax rounds the weights to `bf16` before `P·V` (a `bf16` computation without
    /// `force_fp32_for_softmax`), so the `bf16` products may take the probabilities rounded.
    pub weights_bf16: bool,
}

impl<'a, E: Element> FlashArgs<'a, E> {
    /// The arguments of a validated call of the output function (with the summary of its
    /// mask tensor, whose allocation can fail).
    pub(crate) fn of_call<B: Element>(
        call: &'a Call<'a, E, B>,
        value: &'a [E],
    ) -> Result<Self, AttnError> {
        let explicit_blocks = match &call.mask {
            Some(mask) if call.kv_len > 0 => MaskBlocks::new(mask)?,
            _ => None,
        };
        Ok(FlashArgs {
            dims: Dims {
                batch: call.batch,
                q_len: call.q_len,
                kv_len: call.kv_len,
                heads: call.heads,
                kv_heads: call.kv_heads,
                qk_depth: call.qk_depth,
                v_depth: call.v_depth,
            },
            query: call.query,
            key: call.key,
            value,
            query_scale: call.query_scale,
            bias: call.bias.as_ref().map(|b| b as &dyn BiasRows),
            mask: FlashMask {
                vis: call.vis.clone(),
                explicit: call.mask.clone(),
                explicit_blocks,
            },
            big_neg: call.big_neg,
            dropout: call.dropout.as_ref().map(|(plan, rng)| FlashDropout {
                rng: rng.clone(),
                threshold: plan.threshold,
                multiplier: plan.multiplier,
                broadcast: plan.broadcast,
            }),
            accumulate_f64: call.plan.accumulate_f64(),
            weights_bf16: call.plan.weights == DType::BF16,
        })
    }
}
