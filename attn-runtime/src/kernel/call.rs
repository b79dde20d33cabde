//! A validated call ([`Call`]): sizes checked against the operands, bias and mask resolved
//! against the logits shape, the dtype and dropout plans. Every entry point builds one
//! ([`Call::new`]) and hands it to the dispatch or a driver; the drivers read it. It imports
//! only the leaf modules it is made of (`geometry`, `options`, `broadcast`, `visibility`,
//! `plan`), never a driver or the module that declares it.

use super::broadcast::{Broadcast, Resolved};
use super::geometry::Geometry;
use super::options::Options;
use super::plan::{DTypePlan, DropoutPlan};
use super::visibility::{Mask, Visibility};
use crate::context::Context;
use crate::dim::Dim;
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements};

/// A validated call: sizes, operands resolved against the logits shape, dtype and dropout plans.
pub(crate) struct Call<'a, E, B> {
    /// The leading batch dims.
    pub(super) batch_shape: Vec<usize>,
    /// Their product.
    pub(super) batch: usize,
    /// Query heads.
    pub(super) heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub(super) kv_heads: usize,
    /// Query length.
    pub(super) q_len: usize,
    /// Key/value length.
    pub(super) kv_len: usize,
    /// Depth of query and key per head.
    pub(super) qk_depth: usize,
    /// Depth of value per head.
    pub(super) v_depth: usize,
    /// `[batch..., q_len, heads, qk_depth]`
    pub(super) query: &'a [E],
    /// `[batch..., kv_len, kv_heads, qk_depth]`
    pub(super) key: &'a [E],
    /// `[batch..., kv_len, kv_heads, v_depth]`, `None` for the weights alone.
    pub(super) value: Option<&'a [E]>,
    /// The bias, resolved against the logits shape.
    pub(super) bias: Option<Resolved<'a, B>>,
    /// The mask tensor, resolved against the logits shape.
    pub(super) mask: Option<Resolved<'a, bool>>,
    /// The structured terms of the mask.
    pub(super) vis: Visibility<'a>,
    /// The dtype of every step.
    pub(super) plan: DTypePlan,
    /// What the query is multiplied by (then rounded to `query_round`).
    pub(super) query_scale: f64,
    /// What a masked logit becomes: Flax's `finfo(compute).min`, jax.nn's
    /// [`LARGE_NEGATIVE`](super::jax::LARGE_NEGATIVE).
    pub(super) big_neg: f64,
    /// The dtype the scaled query and the logits are rounded to: the computation dtype (Flax),
    /// the logits dtype (jax.nn: float32 logits for 16-bit inputs).
    pub(super) query_round: DType,
    /// The dropout plan and the generator, when dropout is active.
    pub(super) dropout: Option<(DropoutPlan, rand_pcg::Pcg32)>,
    /// Whether the output rows of padded queries are zeroed after the value product (jax.nn).
    pub(super) zero_padded_rows: bool,
}

impl<'a, E: Element, B: Element> Call<'a, E, B> {
    /// Validates the sizes of the operands against `geom`, resolves bias and mask against the
    /// logits shape and plans the dtypes and dropout of a Flax-semantics call.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new<H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
        geom: &Geometry<'_, H, G, Dk, Dv>,
        query: &'a [E],
        key: &'a [E],
        value: Option<&'a [E]>,
        bias: Option<&Broadcast<'a, B>>,
        mask: &Mask<'a>,
        opts: &Options,
        ctx: &Context<'_>,
    ) -> Result<Self, AttnError> {
        let heads = geom.heads.size();
        let kv_heads = geom.kv_heads.size();
        let qk_depth = geom.qk_depth.size();
        let v_depth = geom.v_depth.size();
        let (q_len, kv_len) = (geom.q_len, geom.kv_len);
        let batch = num_elements("query", geom.batch_shape)?;
        let shape = |len: usize, heads: usize, depth: usize| {
            let mut s = geom.batch_shape.to_vec();
            s.extend_from_slice(&[len, heads, depth]);
            s
        };
        if kv_heads == 0 && heads > 0 || kv_heads > 0 && !heads.is_multiple_of(kv_heads) {
            return Err(AttnError::Axis {
                tensor: "key",
                axis: "heads (axis -2)".into(),
                expected: format!("a divisor of the query's {heads} heads"),
                found: kv_heads,
            });
        }
        let check = |tensor: &'static str, len: usize, shape: Vec<usize>| {
            let expected = num_elements(tensor, &shape)?;
            if expected != len {
                return Err(AttnError::Length {
                    tensor,
                    shape,
                    expected,
                    found: len,
                });
            }
            Ok(())
        };
        check("query", query.len(), shape(q_len, heads, qk_depth))?;
        check("key", key.len(), shape(kv_len, kv_heads, qk_depth))?;
        if let Some(v) = value {
            check("value", v.len(), shape(kv_len, kv_heads, v_depth))?;
        }
        let vis = Visibility::new(mask, batch, q_len, kv_len)?;
        let mut logits_shape = geom.batch_shape.to_vec();
        logits_shape.extend_from_slice(&[heads, q_len, kv_len]);
        num_elements("weights", &logits_shape)?;
        let dropout_plan = DropoutPlan::new(
            opts.dropout_rate,
            opts.broadcast_dropout,
            ctx.deterministic,
            ctx.dropout_rng.is_some(),
            E::DTYPE,
        )?;
        let plan = DTypePlan::new(
            E::DTYPE,
            bias.map(|_| B::DTYPE),
            opts.force_fp32_for_softmax,
            dropout_plan.is_some(),
        );
        let resolve_bias = bias
            .map(|b| Resolved::new(b, geom.batch_shape, heads, q_len, kv_len))
            .transpose()?;
        let resolve_mask = mask
            .dense
            .as_ref()
            .map(|m| Resolved::new(m, geom.batch_shape, heads, q_len, kv_len))
            .transpose()?;
        let dropout = match (dropout_plan, ctx.dropout_rng) {
            (Some(p), Some(rng)) => Some((p, rng.generator())),
            _ => None,
        };
        Ok(Call {
            batch_shape: geom.batch_shape.to_vec(),
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            qk_depth,
            v_depth,
            query,
            key,
            value,
            bias: resolve_bias,
            mask: resolve_mask,
            vis,
            query_scale: plan.query_scale(qk_depth, opts.scale),
            big_neg: plan.compute.finfo_min().unwrap_or(f64::MIN),
            query_round: plan.compute,
            plan,
            dropout,
            zero_padded_rows: false,
        })
    }

    /// `T` must be `expected`: else [`AttnError::DType`] naming `tensor`.
    pub(super) fn check_dtype<T: Element>(
        &self,
        tensor: &'static str,
        expected: DType,
    ) -> Result<(), AttnError> {
        if T::DTYPE != expected {
            return Err(AttnError::DType {
                tensor,
                expected,
                found: T::DTYPE,
            });
        }
        Ok(())
    }

    /// `len` must be the element count of `shape`: else [`AttnError::Length`] naming `tensor`.
    pub(super) fn check_len(
        &self,
        tensor: &'static str,
        len: usize,
        shape: &[usize],
    ) -> Result<(), AttnError> {
        let expected = num_elements(tensor, shape)?;
        if len != expected {
            return Err(AttnError::Length {
                tensor,
                shape: shape.to_vec(),
                expected,
                found: len,
            });
        }
        Ok(())
    }

    /// The key/value head query head `h` reads (grouped-query attention).
    #[inline]
    pub(super) fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// `[batch..., heads, q_len, kv_len]`
    pub(super) fn weights_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.heads, self.q_len, self.kv_len]);
        s
    }

    /// `[batch..., q_len, heads]`: the logsumexp of each row.
    pub(super) fn lse_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.q_len, self.heads]);
        s
    }

    /// `[batch..., q_len, heads, v_depth]`
    pub(super) fn output_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.q_len, self.heads, self.v_depth]);
        s
    }
}
