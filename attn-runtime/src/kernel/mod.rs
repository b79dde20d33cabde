//! The kernel layer: typed, strided attention over `[batch..., len, heads, depth]` slices. This
//! is what `attention!`-generated code calls; the Flax-style API ([`crate::flax`]) is built on it.
//!
//! Files: `broadcast.rs` (bias/mask operands), `visibility.rs` (the structured mask terms),
//! `plan.rs` (the dtype plan = Flax's rounding points), `rowpass.rs` (the fused
//! bias/mask/softmax/dropout pass over one row of logits), `materialized.rs` (the per-(batch,
//! head) driver that builds the `q × kv` logits matrix), `flash/` (the tiled online-softmax
//! output path that never builds the `q × kv` matrix, one concept per file: see its module
//! docs), `backward/` (the gradients), `jax.rs` (jax.nn's numerics), `gemm/` (strided views,
//! `matrixmultiply` calls and thin products), `real.rs` (f32/f64 arithmetic), `exp.rs` (a
//! vectorizable `exp`), `dot.rs` (a vectorizable dot product), `transpose.rs` (the tiled
//! transpose of operand layouts), `isa/` (the instruction sets: `isa::Isa` detected once per
//! process, one backend file per instruction set, portable, AVX2, AVX-512, AVX512-BF16, behind
//! safe entry points). `unsafe` code lives in `gemm/mod.rs` and the backend files of `isa/`
//! only. Which driver computes a call is decided in one place: `choose_path`.
//!
//! The code that uses the instruction sets (`materialized.rs`, `flash/`, `rowpass.rs`, `dot.rs`,
//! `transpose.rs`) imports them through `isa/mod.rs` only; `isa/` imports none of it, so the
//! imports between the drivers and the instruction sets form a DAG.

mod backward;
mod broadcast;
mod dot;
pub(crate) mod exp;
mod flash;
pub(crate) mod gemm;
mod isa;
mod jax;
mod materialized;
mod plan;
mod real;
pub(crate) mod round;
mod rowpass;
mod transpose;
mod visibility;

pub(crate) use backward::sum_to_shape;
pub use backward::{
    Grads, Residuals, attention_backward, attention_bwd, attention_fwd, attention_weights_backward,
    jax_attention_backward,
};
pub use broadcast::{Broadcast, broadcast_shapes};
pub use isa::Isa;
pub use jax::{JaxOptions, LARGE_NEGATIVE, attention_lse, jax_attention, jax_dtypes};
pub use plan::DTypePlan;
pub use visibility::{Align, Mask, SegmentIds, Window};

use crate::context::Context;
use crate::dim::Dim;
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements};
use broadcast::Resolved;
use plan::DropoutPlan;
use visibility::Visibility;

/// Sizes of one attention call. Dims are type parameters so that generated code can pass
/// static sizes ([`Const<N>`](crate::Const)) or run-time sizes (`usize`) alike.
#[derive(Clone, Copy, Debug)]
pub struct Geometry<'b, H: Dim, G: Dim, Dk: Dim, Dv: Dim> {
    /// Zero or more leading batch dims, shared by query, key, value and the results.
    pub batch_shape: &'b [usize],
    /// Query length.
    pub q_len: usize,
    /// Key/value length.
    pub kv_len: usize,
    /// Number of query heads.
    pub heads: H,
    /// Number of key/value heads: `heads` itself, or a divisor of it (grouped-query attention;
    /// 1 is multi-query attention). Query head `n` reads key/value head `n / (heads / kv_heads)`.
    pub kv_heads: G,
    /// Depth of query and key per head.
    pub qk_depth: Dk,
    /// Depth of value per head (ignored by [`attention_weights`]).
    pub v_depth: Dv,
}

/// `jax.lax.Precision`: accepted for parity with Flax; it has no effect on the CPU (as in JAX,
/// where all values give bit-identical results on the CPU backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// `None` / `DEFAULT`
    #[default]
    Default,
    /// `HIGH`
    High,
    /// `HIGHEST`
    Highest,
}

/// The non-tensor options of an attention call. `Options::default()` has Flax's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// `None`: Flax's scaling, `query / round(sqrt(depth))` (as XLA computes it). `Some(s)`:
    /// the query is multiplied by `s` (rounded to the computation dtype) instead.
    pub scale: Option<f64>,
    /// Flax's `dropout_rate`, in `[0, 1]`.
    pub dropout_rate: f64,
    /// Flax's `broadcast_dropout`: one dropout mask `[q, kv]` shared by batch and heads.
    pub broadcast_dropout: bool,
    /// Flax's `force_fp32_for_softmax`.
    pub force_fp32_for_softmax: bool,
    /// Flax's `precision` (no effect on the CPU).
    pub precision: Precision,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scale: None,
            dropout_rate: 0.0,
            broadcast_dropout: true,
            force_fp32_for_softmax: false,
            precision: Precision::Default,
        }
    }
}

/// The dtypes Flax gives the weights and the output for computation dtype `compute`, an
/// optional bias dtype, the options and whether dropout is active (`!deterministic && rate > 0`).
pub fn result_dtypes(
    compute: DType,
    bias: Option<DType>,
    opts: &Options,
    dropout_active: bool,
) -> DTypePlan {
    DTypePlan::new(compute, bias, opts.force_fp32_for_softmax, dropout_active)
}

/// `weights = softmax(mask(scale·q·kᵀ + bias))`, then dropout, written into `out`
/// `[batch..., heads, q_len, kv_len]` (Flax's `dot_product_attention_weights`).
///
/// `query` is `[batch..., q_len, heads, qk_depth]`, `key` `[batch..., kv_len, heads, qk_depth]`,
/// both of the computation dtype `E`. `W` must be the dtype Flax returns (see [`DTypePlan`]:
/// `dropped_weights`), else an error says which dtype is expected.
#[allow(clippy::too_many_arguments)]
pub fn attention_weights<E: Element, B: Element, W: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    out: &mut [W],
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, None, bias, mask, opts, ctx)?;
    call.check_dtype::<W>("weights", call.plan.dropped_weights)?;
    call.check_len("weights", out.len(), &call.weights_shape())?;
    run(&call, Some(out), None::<&mut [W]>, ctx)
}

/// `output = weights · value`, written into `out` `[batch..., q_len, heads, v_depth]` (Flax's
/// `dot_product_attention`). `value` is `[batch..., kv_len, heads, v_depth]` of dtype `E`;
/// `O` must be Flax's output dtype (see [`DTypePlan`]: `output`).
#[allow(clippy::too_many_arguments)]
pub fn attention<E: Element, B: Element, O: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    out: &mut [O],
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, Some(value), bias, mask, opts, ctx)?;
    call.check_dtype::<O>("output", call.plan.output)?;
    call.check_len("output", out.len(), &call.output_shape())?;
    run(&call, None::<&mut [O]>, Some(out), ctx)
}

/// A validated call: sizes, operands resolved against the logits shape, dtype and dropout plans.
pub(crate) struct Call<'a, E, B> {
    batch_shape: Vec<usize>,
    batch: usize,
    heads: usize,
    /// Key/value heads (a divisor of `heads`).
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    qk_depth: usize,
    v_depth: usize,
    query: &'a [E],
    key: &'a [E],
    value: Option<&'a [E]>,
    bias: Option<Resolved<'a, B>>,
    mask: Option<Resolved<'a, bool>>,
    /// The structured terms of the mask.
    vis: Visibility<'a>,
    plan: DTypePlan,
    query_scale: f64,
    /// What a masked logit becomes: Flax's `finfo(compute).min`, jax.nn's
    /// [`LARGE_NEGATIVE`].
    big_neg: f64,
    /// The dtype the scaled query and the logits are rounded to: the computation dtype (Flax),
    /// the logits dtype (jax.nn: float32 logits for 16-bit inputs).
    query_round: DType,
    dropout: Option<(DropoutPlan, rand_pcg::Pcg32)>,
    /// Whether the output rows of padded queries are zeroed after the value product (jax.nn).
    zero_padded_rows: bool,
}

impl<'a, E: Element, B: Element> Call<'a, E, B> {
    #[allow(clippy::too_many_arguments)]
    fn new<H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
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

    fn check_dtype<T: Element>(
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

    fn check_len(
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
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// `[batch..., heads, q_len, kv_len]`
    fn weights_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.heads, self.q_len, self.kv_len]);
        s
    }

    /// `[batch..., q_len, heads]`: the logsumexp of each row.
    fn lse_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.q_len, self.heads]);
        s
    }

    /// `[batch..., q_len, heads, v_depth]`
    fn output_shape(&self) -> Vec<usize> {
        let mut s = self.batch_shape.clone();
        s.extend_from_slice(&[self.q_len, self.heads, self.v_depth]);
        s
    }
}

/// The checks of a call's dropout arguments alone (the rate, the generator), for callers that
/// return an empty result without running a call: the same errors as a call would give.
pub(crate) fn check_dropout(
    opts: &Options,
    ctx: &Context<'_>,
    compute: DType,
) -> Result<(), AttnError> {
    DropoutPlan::new(
        opts.dropout_rate,
        opts.broadcast_dropout,
        ctx.deterministic,
        ctx.dropout_rng.is_some(),
        compute,
    )
    .map(drop)
}

/// The algorithms that can compute a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Per (batch, head): the full `q × kv` logits matrix, the row pass, then `P·V`.
    Materialized,
    /// Tiled online softmax over blocks of queries and keys (`flash.rs`): no `q × kv` matrix.
    Tiled,
}

/// Picks the algorithm: the one place that decides between the weights path and the output
/// path. Weights requested or sown need the materialized matrix; everything else takes the
/// tiled path. The conformance tests force each path through this rule: with a sow sink
/// (materialized) and without one (tiled).
fn choose_path<E, B>(call: &Call<'_, E, B>, needs_weights: bool) -> Path {
    // The tiled path runs the softmax in the computation dtype. float64 with
    // `force_fp32_for_softmax` runs it in float32, where Flax's big_neg (f64::MIN) becomes -inf
    // and a fully masked row NaN; only the materialized path reproduces that.
    // (jax.nn's masked logit is finite in float32: the tiled path computes its rows.)
    let f64_softmax_in_f32 = call.plan.compute == DType::F64
        && call.plan.softmax == DType::F32
        && call.big_neg < f64::from(f32::MIN);
    if needs_weights || f64_softmax_in_f32 {
        Path::Materialized
    } else {
        Path::Tiled
    }
}

/// Runs a validated call, computing in f64 when Flax's steps involve f64, else in f32.
fn run<E: Element, B: Element, W: Element, O: Element>(
    call: &Call<'_, E, B>,
    weights: Option<&mut [W]>,
    output: Option<&mut [O]>,
    ctx: &mut Context<'_>,
) -> Result<(), AttnError> {
    let needs_weights = weights.is_some() || ctx.sow.is_some();
    // An empty result nobody sows costs nothing: no logit is computed for an output of depth 0
    // (or of no query, head or batch element), however long the keys.
    let empty = weights.as_ref().is_none_or(|w| w.is_empty())
        && output.as_ref().is_none_or(|o| o.is_empty());
    if empty && ctx.sow.is_none() {
        return Ok(());
    }
    match choose_path(call, needs_weights) {
        Path::Tiled => {
            let Some(out) = output else {
                unreachable!("the tiled path is chosen only for output calls without weights")
            };
            run_tiled(call, out, None, ctx)
        }
        Path::Materialized => {
            if call.plan.accumulate_f64() {
                materialized::run::<E, B, W, O, f64>(call, weights, output, ctx)
            } else {
                materialized::run::<E, B, W, O, f32>(call, weights, output, ctx)
            }
        }
    }
}

/// Runs a validated output call (it has a value) on the tiled path, writing each row's
/// logsumexp into `lse` (`[batch..., q_len, heads]`) if given.
fn run_tiled<E: Element, B: Element, O: Element>(
    call: &Call<'_, E, B>,
    out: &mut [O],
    lse: Option<&mut [f64]>,
    ctx: &mut Context<'_>,
) -> Result<(), AttnError> {
    let Some(value) = call.value else {
        unreachable!("the tiled path is chosen only for output calls")
    };
    let args = flash::FlashArgs::of_call(call, value)?;
    let isa = isa::Isa::detect();
    let threads = ctx.threads();
    threads.install(|| flash::flash_attention(&args, out, lse, isa, threads))
}
