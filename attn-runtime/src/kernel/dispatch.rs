//! Which driver computes a validated [`Call`], decided in one place ([`choose_path`]), and the
//! runs of a call on the chosen driver ([`run`], [`run_tiled`]). The entry points of
//! `mod.rs`, `jax.rs` and `backward/` call it; it imports the drivers (`materialized.rs`,
//! `flash/`) and `call.rs`, and none of them imports it.

use super::call::Call;
use super::{flash, isa, materialized};
use crate::context::Context;
use crate::element::{DType, Element};
use crate::error::AttnError;

/// The algorithms that can compute a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    /// Per (batch, head): the full `q × kv` logits matrix, the row pass, then `P·V`.
    Materialized,
    /// Tiled online softmax over blocks of queries and keys (`flash/`): no `q × kv` matrix.
    Tiled,
}

/// Picks the algorithm: the one place that decides between the weights path and the output
/// path. Weights requested or sown need the materialized matrix; everything else takes the
/// tiled path. The conformance tests force each path through this rule: with a sow sink
/// (materialized) and without one (tiled).
pub(super) fn choose_path<E, B>(call: &Call<'_, E, B>, needs_weights: bool) -> Path {
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
pub(super) fn run<E: Element, B: Element, W: Element, O: Element>(
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
pub(super) fn run_tiled<E: Element, B: Element, O: Element>(
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
