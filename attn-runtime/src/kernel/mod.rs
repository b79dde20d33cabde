//! The kernel layer: typed, strided attention over `[batch..., len, heads, depth]` slices. This
//! is what `attention!`-generated code calls; the Flax-style API ([`crate::flax`]) is built on it.
//!
//! Files: this file (the module tree, the re-exports, the entry points [`attention_weights`],
//! [`attention`] and [`result_dtypes`]), `geometry.rs` and `options.rs` (the sizes and the
//! non-tensor options of a call), `call.rs` (a validated call: sizes, operands, dtype and
//! dropout plans), `dispatch.rs` (which driver computes a call, decided in one place:
//! `choose_path`), `broadcast.rs` (bias/mask operands), `visibility.rs` (the structured mask
//! terms), `plan.rs` (the dtype plan = Flax's rounding points), `rowpass.rs` (the fused
//! bias/mask/softmax/dropout pass over one row of logits), `materialized.rs` (the per-(batch,
//! head) driver that builds the `q × kv` logits matrix), `flash/` (the tiled online-softmax
//! output path that never builds the `q × kv` matrix, one concept per file: see its module
//! docs), `backward/` (the gradients), `jax.rs` (jax.nn's numerics), `gemm/` (strided views,
//! `matrixmultiply` calls and thin products), `real.rs` (f32/f64 arithmetic), `exp.rs` (a
//! vectorizable `exp`), `dot.rs` (a vectorizable dot product), `transpose.rs` (the tiled
//! transpose of operand layouts), `isa/` (the instruction sets: [`Isa`] detected once per
//! process and capped by `ATTN_MAX_ISA`, one backend per instruction set, portable, AVX2, AVX-512, AVX512-BF16, behind safe
//! entry points). `unsafe` code lives in `gemm/` (`mod.rs`, `mat.rs`) and the backend files of
//! `isa/` only.
//!
//! The imports between these modules form a DAG; each line lists what a module imports (its
//! own files' imports are in the module docs of `flash/`, `backward/`, `gemm/` and `isa/`):
//!
//! - `mod.rs` → `call`, `dispatch`, and the public items of `backward`, `broadcast`,
//!   `geometry`, `isa`, `jax`, `options`, `plan`, `visibility` (re-exported)
//! - `backward/` → `jax`, `dispatch`, `call`, `rowpass`, `real`, `gemm`, `exp`, `geometry`,
//!   `options`, `broadcast`, `visibility`
//! - `jax.rs` → `dispatch`, `call`, `plan`, `geometry`, `options`, `broadcast`, `visibility`
//! - `dispatch.rs` → `flash`, `materialized`, `call`, `isa`
//! - `materialized.rs` → `call`, `rowpass`, `real`, `gemm`, `dot`, `transpose`, `round`, `exp`,
//!   `isa`
//! - `flash/` → `call`, `dot`, `transpose`, `round`, `exp`, `isa`, `broadcast`, `visibility`
//! - `call.rs` → `geometry`, `options`, `plan`, `broadcast`, `visibility`
//! - `rowpass.rs` → `real`, `round`, `plan`, `exp`, `isa`, `broadcast`
//! - `real.rs` → `gemm`, `dot`, `round`
//! - `gemm/` → `dot`; `dot.rs` and `transpose.rs` → `isa`; `isa/` → `exp`;
//!   `visibility.rs` → `broadcast`
//! - leaves (no import from the kernels): `geometry.rs`, `options.rs`, `plan.rs`, `broadcast.rs`,
//!   `round.rs`, `exp.rs`
//!
//! No file of the kernels imports this one, and no file of a directory imports its `mod.rs`
//! (except `flash/testing.rs`, compiled for tests only, which calls the driver it tests). The
//! code that uses the instruction sets imports them through `isa/mod.rs` only; `isa/` imports
//! none of it.

mod backward;
mod broadcast;
mod call;
mod dispatch;
mod dot;
pub(crate) mod exp;
mod flash;
pub(crate) mod gemm;
mod geometry;
mod isa;
mod jax;
mod materialized;
mod options;
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
pub use geometry::Geometry;
pub use isa::Isa;
pub use jax::{JaxOptions, LARGE_NEGATIVE, attention_lse, jax_attention, jax_dtypes};
pub use options::{Options, Precision};
pub use plan::DTypePlan;
pub use visibility::{Align, Mask, SegmentIds, Window};

use crate::context::Context;
use crate::dim::Dim;
use crate::element::{DType, Element};
use crate::error::AttnError;
use call::Call;
use dispatch::run;
use plan::DropoutPlan;

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
