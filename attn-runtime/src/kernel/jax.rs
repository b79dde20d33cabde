//! `jax.nn.dot_product_attention`'s numerics on the kernel layer ([`jax_attention`]), and the
//! per-row logsumexp of a Flax-semantics forward ([`attention_lse`]).
//!
//! jax.nn differs from Flax in where it rounds and what a masked logit becomes (conformance
//! README, "Set `jax_nn/`", steps 3-8): the logits are float32 for 16-bit inputs (float64 for
//! float64) and never rounded to 16 bits; `scale` multiplies the logits (here: the query, in the
//! logits dtype, which differs by the rounding of one product); masked logits become
//! [`LARGE_NEGATIVE`]; the softmax runs in float32; the probabilities are rounded to the input
//! dtype; padded query rows are zeroed after the value product. A call is a [`Call`] whose plan,
//! masked logit and query rounding are set to these, then the same drivers as Flax's.

use super::broadcast::Broadcast;
use super::call::Call;
use super::dispatch::{run, run_tiled};
use super::geometry::Geometry;
use super::options::Options;
use super::plan::DTypePlan;
use super::visibility::Mask;
use crate::context::Context;
use crate::dim::Dim;
use crate::element::{DType, Element};
use crate::error::AttnError;

/// What jax.nn replaces a masked logit with: `-0.7 · finfo(float32).max`, evaluated in float32
/// (the same value for float64 logits).
pub const LARGE_NEGATIVE: f64 = (-0.7f32 * f32::MAX) as f64;

/// The non-tensor options of [`jax_attention`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct JaxOptions {
    /// `scale`: multiplies the logits; `None` = `1 / sqrt(qk_depth)` rounded to the logits dtype.
    pub scale: Option<f64>,
}

/// The dtypes of a jax.nn call with inputs of dtype `input`: float32 logits (float64 for
/// float64 inputs), float32 softmax, probabilities and output in the input dtype.
pub fn jax_dtypes(input: DType) -> DTypePlan {
    let logits = if input == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    DTypePlan {
        compute: input,
        logits,
        softmax: DType::F32,
        weights: input,
        dropped_weights: input,
        output: input,
    }
}

/// `jax.nn.dot_product_attention` (XLA implementation) on slices: `query [batch..., q_len,
/// heads, depth]`, key and value `[batch..., kv_len, kv_heads, depth]` of dtype `E`, the output
/// `out` `[batch..., q_len, heads, v_depth]` of dtype `E`. The mask's structured terms give jax's
/// `is_causal` (top-left), `local_window_size`, `query_seq_lengths` and
/// `key_value_seq_lengths`; query rows at or past their query length are zeroed.
///
/// `residual`, if given, receives the natural-log logsumexp of each row's scaled, biased,
/// masked logits, `[batch..., q_len, heads]`, from the tiled output path (a sow sink in `ctx` is
/// then an error). Without it, a sow sink selects the weights path and receives the
/// probabilities `[batch..., heads, q_len, kv_len]` in dtype `E`.
#[allow(clippy::too_many_arguments)]
pub fn jax_attention<E: Element, B: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &JaxOptions,
    ctx: &mut Context<'_>,
    out: &mut [E],
    residual: Option<&mut [f64]>,
) -> Result<(), AttnError> {
    let call = jax_call(geom, query, key, value, bias, mask, opts, ctx)?;
    call.check_len("output", out.len(), &call.output_shape())?;
    match residual {
        Some(lse) => {
            call.check_len("residual", lse.len(), &call.lse_shape())?;
            if ctx.sow.is_some() {
                return Err(AttnError::InvalidArgument {
                    argument: "residual",
                    reason: "expected no sow sink with a residual: the residual comes from \
                             the tiled output path, a sink selects the weights path"
                        .into(),
                });
            }
            run_tiled(&call, out, Some(lse), ctx)?;
        }
        None => run(&call, None::<&mut [E]>, Some(&mut *out), ctx)?,
    }
    zero_padded_rows(&call, mask, out);
    Ok(())
}

/// A validated jax.nn call: the [`Call`] of the same tensors with jax's dtype plan, masked
/// logit, rounding of the scaled query (in the logits dtype) and scale.
#[allow(clippy::too_many_arguments)]
pub(crate) fn jax_call<'a, E: Element, B: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &'a [E],
    key: &'a [E],
    value: &'a [E],
    bias: Option<&Broadcast<'a, B>>,
    mask: &Mask<'a>,
    opts: &JaxOptions,
    ctx: &Context<'_>,
) -> Result<Call<'a, E, B>, AttnError> {
    if ctx.dropout_rng.is_some() && !ctx.deterministic {
        return Err(AttnError::InvalidArgument {
            argument: "dropout_rng",
            reason: "expected none: jax.nn.dot_product_attention has no dropout".into(),
        });
    }
    let mut call = Call::new(
        geom,
        query,
        key,
        Some(value),
        bias,
        mask,
        &Options::default(),
        ctx,
    )?;
    call.plan = jax_dtypes(E::DTYPE);
    call.big_neg = LARGE_NEGATIVE;
    call.query_round = call.plan.logits;
    let depth = call.qk_depth;
    call.query_scale = call
        .plan
        .logits
        .round_f64(opts.scale.unwrap_or_else(|| 1.0 / (depth as f64).sqrt()));
    call.zero_padded_rows = true;
    Ok(call)
}

/// `out[b, i] *= 0` for the query rows `i >= query_lengths[b]` (jax multiplies them by 0, so a
/// negative mean becomes `-0.0`).
fn zero_padded_rows<E: Element, B>(call: &Call<'_, E, B>, mask: &Mask<'_>, out: &mut [E]) {
    let Some(lengths) = mask.query_lengths else {
        return;
    };
    let row = call.heads * call.v_depth;
    if row == 0 || call.q_len == 0 {
        return;
    }
    for (b, per_batch) in out.chunks_mut(call.q_len * row).enumerate() {
        let len = usize::try_from(lengths[b]).unwrap_or(0).min(call.q_len);
        for x in &mut per_batch[len * row..] {
            *x = E::from_f64(x.to_f64() * 0.0);
        }
    }
}

/// Flax's `dot_product_attention` ([`super::attention`], same arguments) that also writes the
/// natural-log logsumexp of every row's masked logits (after scale, bias and mask, before
/// dropout) into `lse`, `[batch..., q_len, heads]`, in `f64` (values of the arithmetic the call
/// runs in: f32 unless Flax computes in f64). The softmax weights of row `(b, i, n)` are
/// `exp(logit - lse)`: what a backward pass needs to recompute them.
///
/// Always runs the tiled output path: a sow sink in `ctx` is an error here. float64 calls with
/// `force_fp32_for_softmax`, whose fully masked rows are NaN in Flax, give uniform rows here.
#[allow(clippy::too_many_arguments)]
pub fn attention_lse<E: Element, B: Element, O: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    out: &mut [O],
    lse: &mut [f64],
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, Some(value), bias, mask, opts, ctx)?;
    call.check_dtype::<O>("output", call.plan.output)?;
    call.check_len("output", out.len(), &call.output_shape())?;
    call.check_len("lse", lse.len(), &call.lse_shape())?;
    if ctx.sow.is_some() {
        return Err(AttnError::InvalidArgument {
            argument: "lse",
            reason: "expected no sow sink: the logsumexp comes from the tiled output path".into(),
        });
    }
    run_tiled(&call, out, Some(lse), ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_negative_is_jax_value() {
        // conformance README "Set jax_nn/" step 5.
        assert_eq!(LARGE_NEGATIVE, -2.381976325057654e38);
    }
}
