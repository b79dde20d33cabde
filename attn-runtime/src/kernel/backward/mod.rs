//! The backward pass: vector–Jacobian products of [`super::attention`],
//! [`super::attention_weights`] and [`super::jax_attention`] (docs/runtime.md, "Gradients").
//!
//! Files: `mod.rs` (the public entries, validation, the fixed-order reductions: key/value
//! gradients over the query heads of a group, the bias gradient to the bias's own shape),
//! `weights.rs` (the materialized backward: per (batch, head), the weights recomputed as the
//! forward computes them, then `dS = P ⊙ (dP − rowsum(P ⊙ dP))`), `tiled.rs` (the
//! FlashAttention-2-style backward from each row's logsumexp, blocks of queries and keys),
//! `parts.rs` (what the two drivers read and return: [`Widened`], [`RowStats`],
//! [`Partials`](parts::Partials)), `residuals.rs` (the forward that keeps the residuals, and
//! their check). The imports form a DAG: `mod.rs` imports the four others, `tiled.rs` imports
//! `weights.rs` (its chunking) and `parts.rs`, `weights.rs` imports `parts.rs`; no file imports
//! `mod.rs`. Outside `backward/` they import `call.rs`, `dispatch.rs` (`residuals.rs`),
//! `jax.rs` (`mod.rs`) and the leaf modules, none of which imports the backward.
//!
//! Every (batch, head) task writes its own partial gradients: the query gradient of its head,
//! the key/value gradients of its query head (`[batch, heads, kv, depth]`) and, with a bias,
//! its block of logit gradients. The sums over a group's query heads and over the bias's
//! broadcast axes run afterwards in index order, so the bits never depend on the threads.

mod parts;
mod residuals;
mod tiled;
mod weights;

pub use residuals::{Residuals, attention_fwd};

use std::borrow::Cow;

use super::broadcast::Broadcast;
use super::call::Call;
use super::geometry::Geometry;
use super::jax::{JaxOptions, jax_call};
use super::options::Options;
use super::real::Real;
use super::visibility::Mask;
use crate::context::{Context, Threads};
use crate::dim::Dim;
use crate::element::Element;
use crate::error::{AttnError, num_elements, try_filled};
use crate::flax::expand::Offsets;
use parts::{RowStats, Widened};

/// Where the gradients of a backward call go. `query`, `key`, `value` have the shapes of the
/// forward's inputs (`value` empty for [`attention_weights_backward`]) in the computation
/// dtype `E`; `bias`, if given, the shape of the bias operand ([`Broadcast::shape`]) in its
/// dtype `B`: the gradient summed over the axes along which the bias broadcasts.
pub struct Grads<'g, E, B> {
    /// `[batch..., q_len, heads, qk_depth]`
    pub query: &'g mut [E],
    /// `[batch..., kv_len, kv_heads, qk_depth]` (summed over each group's query heads)
    pub key: &'g mut [E],
    /// `[batch..., kv_len, kv_heads, v_depth]` (empty for the weights' backward)
    pub value: &'g mut [E],
    /// The bias operand's shape, or `None` for no bias gradient.
    pub bias: Option<&'g mut [B]>,
}

/// The VJP of [`super::attention`]: given `cotangent` `[batch..., q_len, heads, v_depth]` (the
/// output's dtype `O`), writes the gradients of query, key, value and bias into `grads`. Same
/// arguments as the forward; dropout is regenerated from `ctx`'s RNG (the forward's seed).
/// With a sow sink in `ctx` the materialized weights path computes it (nothing is sown), else
/// the tiled path.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<E: Element, B: Element, O: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    cotangent: &[O],
    grads: Grads<'_, E, B>,
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, Some(value), bias, mask, opts, ctx)?;
    call.check_dtype::<O>("cotangent", call.plan.output)?;
    call.check_len("cotangent", cotangent.len(), &call.output_shape())?;
    let tiled = ctx.sow.is_none() && tiled::supports(&call);
    backward(
        &call,
        bias,
        Cot::Output(cotangent),
        grads,
        ctx.threads(),
        tiled,
        None,
    )
}

/// The backward of [`attention_fwd`] (`jax.custom_vjp`'s `bwd`): the gradients of query, key,
/// value and bias from the forward's `output` and `residuals` and the output's `cotangent`
/// (both `[batch..., q_len, heads, v_depth]` of the output dtype `O`). Same arguments as the
/// forward. The tiled path reads each row's saved logsumexp instead of recomputing it, and
/// `D_i = dO_i · O_i` from `output`: one sweep over the keys instead of two. Residuals of
/// another call (other sizes, options, dropout generator, inputs or output) are
/// [`AttnError::InvalidArgument`] with `argument: "residuals"`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<E: Element, B: Element, O: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    output: &[O],
    residuals: &Residuals,
    cotangent: &[O],
    grads: Grads<'_, E, B>,
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, Some(value), bias, mask, opts, ctx)?;
    call.check_dtype::<O>("output", call.plan.output)?;
    call.check_len("output", output.len(), &call.output_shape())?;
    call.check_dtype::<O>("cotangent", call.plan.output)?;
    call.check_len("cotangent", cotangent.len(), &call.output_shape())?;
    residuals.check(&call, output)?;
    let tiled = ctx.sow.is_none() && tiled::supports(&call);
    let saved = match residuals.logsumexp() {
        Some(lse) if tiled => Some(Saved { lse, output }),
        _ => None,
    };
    backward(
        &call,
        bias,
        Cot::Output(cotangent),
        grads,
        ctx.threads(),
        tiled,
        saved,
    )
}

/// The VJP of [`super::attention_weights`]: given `cotangent` `[batch..., heads, q_len,
/// kv_len]` (the returned weights' dtype `W`), writes the gradients of query, key and bias
/// (`grads.value` must be empty). Dropout is regenerated from `ctx`'s RNG.
#[allow(clippy::too_many_arguments)]
pub fn attention_weights_backward<
    E: Element,
    B: Element,
    W: Element,
    H: Dim,
    G: Dim,
    Dk: Dim,
    Dv: Dim,
>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    cotangent: &[W],
    grads: Grads<'_, E, B>,
) -> Result<(), AttnError> {
    let call = Call::new(geom, query, key, None, bias, mask, opts, ctx)?;
    call.check_dtype::<W>("cotangent", call.plan.dropped_weights)?;
    call.check_len("cotangent", cotangent.len(), &call.weights_shape())?;
    backward(
        &call,
        bias,
        Cot::Weights(cotangent),
        grads,
        ctx.threads(),
        false,
        None,
    )
}

/// The VJP of [`super::jax_attention`] (same arguments, `cotangent` shaped like the output):
/// the gradients of query, key, value and bias. The cotangent of padded query rows
/// (`query_lengths`) is zeroed first, as jax multiplies those output rows by 0.
#[allow(clippy::too_many_arguments)]
pub fn jax_attention_backward<E: Element, B: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &JaxOptions,
    ctx: &mut Context<'_>,
    cotangent: &[E],
    grads: Grads<'_, E, B>,
) -> Result<(), AttnError> {
    let call = jax_call(geom, query, key, value, bias, mask, opts, ctx)?;
    call.check_len("cotangent", cotangent.len(), &call.output_shape())?;
    let tiled = ctx.sow.is_none() && tiled::supports(&call);
    backward(
        &call,
        bias,
        Cot::Output(cotangent),
        grads,
        ctx.threads(),
        tiled,
        None,
    )
}

/// What the forward saved, for the tiled path: each row's logsumexp `[batch, q, heads]` and
/// the output (of the cotangent's dtype).
#[derive(Clone, Copy)]
struct Saved<'s, X> {
    lse: &'s [f64],
    output: &'s [X],
}

/// The cotangent of a call: of the output `[batch.., q, heads, dv]` or of the weights
/// `[batch.., heads, q, kv]`.
#[derive(Clone, Copy)]
enum Cot<'c, X> {
    Output(&'c [X]),
    Weights(&'c [X]),
}

/// `src` in the arithmetic type: borrowed when it is of that type, else widened.
fn widen_or_borrow<'a, X: Element, T: Real>(
    tensor: &'static str,
    src: &'a [X],
) -> Result<Cow<'a, [T]>, AttnError> {
    match T::same_slice(src) {
        Some(same) => Ok(Cow::Borrowed(same)),
        None => widen::<X, T>(tensor, src, |x| x).map(Cow::Owned),
    }
}

fn widen<X: Element, T: Real>(
    tensor: &'static str,
    src: &[X],
    f: impl Fn(T) -> T,
) -> Result<Vec<T>, AttnError> {
    let mut out = try_filled(tensor, src.len(), T::ZERO)?;
    for (o, &x) in out.iter_mut().zip(src) {
        *o = f(T::from_elem(x));
    }
    Ok(out)
}

/// Validates the gradient slices against the call.
fn check_grads<E: Element, B: Element>(
    call: &Call<'_, E, B>,
    bias: Option<&Broadcast<'_, B>>,
    grads: &Grads<'_, E, B>,
) -> Result<(), AttnError> {
    let shape = |len: usize, heads: usize, depth: usize| {
        let mut s = call.batch_shape.clone();
        s.extend_from_slice(&[len, heads, depth]);
        s
    };
    call.check_len(
        "grad query",
        grads.query.len(),
        &shape(call.q_len, call.heads, call.qk_depth),
    )?;
    call.check_len(
        "grad key",
        grads.key.len(),
        &shape(call.kv_len, call.kv_heads, call.qk_depth),
    )?;
    let value_shape = match call.value {
        Some(_) => shape(call.kv_len, call.kv_heads, call.v_depth),
        None => vec![0],
    };
    call.check_len("grad value", grads.value.len(), &value_shape)?;
    match (&grads.bias, bias) {
        (Some(g), Some(b)) => call.check_len("grad bias", g.len(), b.shape()),
        (Some(_), None) => Err(AttnError::InvalidArgument {
            argument: "grad bias",
            reason: "expected none: the call has no bias".into(),
        }),
        _ => Ok(()),
    }
}

fn backward<E: Element, B: Element, X: Element>(
    call: &Call<'_, E, B>,
    bias: Option<&Broadcast<'_, B>>,
    cot: Cot<'_, X>,
    grads: Grads<'_, E, B>,
    threads: Threads<'_>,
    tiled: bool,
    saved: Option<Saved<'_, X>>,
) -> Result<(), AttnError> {
    check_grads(call, bias, &grads)?;
    if call.plan.accumulate_f64() {
        backward_in::<E, B, X, f64>(call, bias, cot, grads, threads, tiled, saved)
    } else {
        backward_in::<E, B, X, f32>(call, bias, cot, grads, threads, tiled, saved)
    }
}

fn backward_in<E: Element, B: Element, X: Element, T: Real>(
    call: &Call<'_, E, B>,
    bias: Option<&Broadcast<'_, B>>,
    cot: Cot<'_, X>,
    grads: Grads<'_, E, B>,
    threads: Threads<'_>,
    tiled: bool,
    saved: Option<Saved<'_, X>>,
) -> Result<(), AttnError> {
    let Grads {
        query: gq,
        key: gk,
        value: gv,
        bias: mut gb,
    } = grads;
    gq.fill(E::default());
    gk.fill(E::default());
    gv.fill(E::default());
    if let Some(g) = gb.as_deref_mut() {
        g.fill(B::default());
    }
    let (q, kv) = (call.q_len, call.kv_len);
    if q == 0 || kv == 0 || call.batch == 0 || call.heads == 0 {
        // Empty sums: every gradient is 0.
        return Ok(());
    }
    if matches!(cot, Cot::Output(_)) && call.v_depth == 0 {
        // An output of depth 0 depends on nothing.
        return Ok(());
    }
    let scale = T::from_f64(call.query_scale);
    let round = call.query_round;
    let mut d = match cot {
        Cot::Output(c) | Cot::Weights(c) => widen::<X, T>("cotangent", c, |x| x)?,
    };
    // jax zeroes the output rows of padded queries: their cotangent never arrives.
    if let (Cot::Output(_), true, Some(lengths)) =
        (cot, call.zero_padded_rows, call.vis.query_lengths_slice())
    {
        let row = call.heads * call.v_depth;
        for (b, per_batch) in d.chunks_mut(q * row.max(1)).enumerate() {
            let len = usize::try_from(lengths[b]).unwrap_or(0).min(q);
            if row > 0 {
                per_batch[len * row..].fill(T::ZERO);
            }
        }
    }
    let ops = Widened {
        qs: widen::<E, T>("widened query", call.query, |x| (x * scale).round_to(round))?,
        k: widen_or_borrow::<E, T>("widened key", call.key)?,
        v: widen_or_borrow::<E, T>("widened value", call.value.unwrap_or(&[]))?,
        d,
        of_weights: matches!(cot, Cot::Weights(_)),
    };
    let want_dlogits = gb.is_some();
    let stats = match saved {
        Some(s) => Some(RowStats {
            lse: s.lse,
            d: row_dots(&ops.d, s.output, call.v_depth)?,
        }),
        None => None,
    };
    // Without grouped heads, in the arithmetic type, the tiled path accumulates the key and
    // value gradients in the caller's slices (already zeroed, in their own layout).
    let in_place = tiled && call.kv_heads == call.heads;
    let direct = match (in_place, T::same_slice_mut(&mut *gk)) {
        (true, Some(k)) => T::same_slice_mut(&mut *gv).map(|v| (k, v)),
        _ => None,
    };
    let written = direct.is_some();
    let parts = if tiled {
        tiled::run::<E, B, T>(call, &ops, stats.as_ref(), direct, want_dlogits, threads)?
    } else {
        weights::run::<E, B, T>(call, &ops, want_dlogits, threads)?
    };
    // The query gradient is per (batch, query, head) already.
    for (o, x) in gq.iter_mut().zip(&parts.dq) {
        *o = x.to_elem::<E>();
    }
    // Key/value: sum each group's query heads, in head order.
    let group = call.heads / call.kv_heads;
    let sum_group = |out: &mut [E], part: &[T], depth: usize| {
        let (heads, kv_heads) = (call.heads, call.kv_heads);
        for b in 0..call.batch {
            for j in 0..kv {
                for g in 0..kv_heads {
                    let o = &mut out[((b * kv + j) * kv_heads + g) * depth..][..depth];
                    for (c, x) in o.iter_mut().enumerate() {
                        let mut s = T::ZERO;
                        for h in g * group..(g + 1) * group {
                            s = s + part[((b * heads + h) * kv + j) * depth + c];
                        }
                        *x = s.to_elem::<E>();
                    }
                }
            }
        }
    };
    if written {
        // Written in place.
    } else if parts.dkv_final {
        for (o, x) in gk.iter_mut().zip(&parts.dk) {
            *o = x.to_elem::<E>();
        }
        for (o, x) in gv.iter_mut().zip(&parts.dv) {
            *o = x.to_elem::<E>();
        }
    } else {
        sum_group(gk, &parts.dk, call.qk_depth);
        if call.value.is_some() {
            sum_group(gv, &parts.dv, call.v_depth);
        }
    }
    if let (Some(g), Some(b), Some(dl)) = (gb, bias, parts.dlogits) {
        let sums = sum_to_shape(&dl, &call.weights_shape(), b.shape())?;
        for (o, s) in g.iter_mut().zip(sums) {
            *o = B::from_f64(s);
        }
    }
    Ok(())
}

/// `D` of every output row: the dot product of the cotangent's row and the output's row, in
/// the arithmetic type (rows of `depth` elements, in order).
fn row_dots<X: Element, T: Real>(d: &[T], output: &[X], depth: usize) -> Result<Vec<T>, AttnError> {
    let mut out = try_filled("row statistics", d.len() / depth, T::ZERO)?;
    for ((o, dr), xr) in out
        .iter_mut()
        .zip(d.chunks_exact(depth))
        .zip(output.chunks_exact(depth))
    {
        let mut acc = T::ZERO;
        for (&a, &x) in dr.iter().zip(xr) {
            acc = acc + a * T::from_elem(x);
        }
        *o = acc;
    }
    Ok(out)
}

/// The sum of `src` (row-major, of shape `src_shape`) over the axes along which `dst_shape`
/// broadcasts to it (NumPy rules), in index order, in f64.
pub(crate) fn sum_to_shape<T: Real>(
    src: &[T],
    src_shape: &[usize],
    dst_shape: &[usize],
) -> Result<Vec<f64>, AttnError> {
    let len = num_elements("gradient", dst_shape)?;
    let mut out = try_filled("gradient", len, 0.0f64)?;
    let offsets = Offsets::new("gradient", dst_shape, src_shape)?;
    for (o, &x) in offsets.zip(src) {
        out[o] += x.to_elem::<f64>();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_broadcast_axes() {
        let src: Vec<f64> = (0..12).map(f64::from).collect();
        // [2, 3, 2] -> [3, 1]
        let s = sum_to_shape(&src, &[2, 3, 2], &[3, 1]).unwrap();
        assert_eq!(
            s,
            vec![0. + 1. + 6. + 7., 2. + 3. + 8. + 9., 4. + 5. + 10. + 11.]
        );
        let s = sum_to_shape(&src, &[2, 3, 2], &[1]).unwrap();
        assert_eq!(s, vec![66.0]);
        assert!(sum_to_shape(&src, &[2, 3, 2], &[4]).is_err());
    }
}
