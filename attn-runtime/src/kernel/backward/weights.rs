//! The materialized backward: one task per (batch, head). A task recomputes its `q × kv`
//! weights exactly as the forward's weights path does (the logits of the scaled, rounded
//! query, the row pass with bias, mask and Flax's rounding points, dropout from the same
//! generator positions), then
//!
//! - `dV_h = P_dᵀ · dO` (`P_d` the weights after dropout),
//! - `dP = (dO · Vᵀ) ⊙ keep` (or the weights' cotangent `⊙ keep`),
//! - `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, 0 where the mask hides the logit,
//! - `dQ_h = scale · dS · K`, `dK_h = dSᵀ · Q_s` (`Q_s` the scaled query), and `dS` itself for
//!   the bias.

use super::super::call::Call;
use super::super::gemm::{MatMut, MatRef, gemm, head_blocks_mut};
use super::super::real::Real;
use super::super::rowpass::{MaskRow, RowPass};
use super::parts::{Partials, Widened};
use crate::context::Threads;
use crate::element::Element;
use crate::error::{AttnError, try_filled};

/// An internal invariant failed (views are built from validated sizes).
pub(super) fn view_bug() -> AttnError {
    AttnError::InvalidArgument {
        argument: "kernel",
        reason: "internal error: a strided view does not fit its slice".into(),
    }
}

/// Splits `s` into `n` consecutive chunks of `len` elements (`len` may be 0).
pub(super) fn chunks<T>(mut s: &mut [T], n: usize, len: usize) -> Vec<&mut [T]> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let rest = std::mem::take(&mut s);
        let (head, tail) = rest.split_at_mut(len.min(rest.len()));
        out.push(head);
        s = tail;
    }
    out
}

/// One (batch, head) task and the parts of the partial gradients it writes.
struct Task<'o, T> {
    bh: usize,
    dq: MatMut<'o, T>,
    dk: &'o mut [T],
    dv: &'o mut [T],
    dlogits: Option<&'o mut [T]>,
}

/// The partial gradients of every (batch, head), computed in parallel.
pub(super) fn run<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    want_dlogits: bool,
    threads: Threads<'_>,
) -> Result<Partials<T>, AttnError> {
    let (nb, heads, q, kv) = (call.batch, call.heads, call.q_len, call.kv_len);
    let (dk, dv) = (call.qk_depth, call.v_depth);
    let mut parts = Partials {
        dkv_final: false,
        dq: try_filled("grad query", nb * q * heads * dk, T::ZERO)?,
        dk: try_filled("grad key (per head)", nb * heads * kv * dk, T::ZERO)?,
        dv: try_filled(
            "grad value (per head)",
            if call.value.is_some() {
                nb * heads * kv * dv
            } else {
                0
            },
            T::ZERO,
        )?,
        dlogits: if want_dlogits {
            Some(try_filled("grad logits", nb * heads * q * kv, T::ZERO)?)
        } else {
            None
        },
    };
    let tasks_n = nb * heads;
    let dq_blocks =
        head_blocks_mut(&mut parts.dq, nb, q, heads, dk, q.max(1)).ok_or_else(view_bug)?;
    let dk_chunks = chunks(&mut parts.dk, tasks_n, kv * dk);
    let dv_len = if call.value.is_some() { kv * dv } else { 0 };
    let dv_chunks = chunks(&mut parts.dv, tasks_n, dv_len);
    let mut dl_chunks: Vec<Option<&mut [T]>> = match parts.dlogits.as_deref_mut() {
        Some(d) => chunks(d, tasks_n, q * kv).into_iter().map(Some).collect(),
        None => (0..tasks_n).map(|_| None).collect(),
    };
    let tasks: Vec<Task<'_, T>> = dq_blocks
        .into_iter()
        .zip(dk_chunks)
        .zip(dv_chunks)
        .zip(dl_chunks.drain(..))
        .enumerate()
        .map(|(bh, (((dq, dk), dv), dlogits))| Task {
            bh,
            dq,
            dk,
            dv,
            dlogits,
        })
        .collect();
    let pass = RowPass::<T>::new(&call.plan).with_big_neg(call.big_neg);
    threads.try_for_each(tasks, |task| head_backward(call, ops, &pass, task))?;
    Ok(parts)
}

/// The weights of head `(b, h)` (`q × kv`, after the forward's row pass, before dropout) into
/// `p`.
pub(super) fn head_weights<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    pass: &RowPass<T>,
    bh: usize,
    p: &mut [T],
) -> Result<(), AttnError> {
    let (heads, q, kv, dk) = (call.heads, call.q_len, call.kv_len, call.qk_depth);
    let (b, h) = (bh / heads, bh % heads);
    let (g, kvh) = (call.kv_head(h), call.kv_heads);
    let qm = MatRef::new(&ops.qs, (b * q * heads + h) * dk, q, dk, heads * dk, 1);
    let kt = MatRef::new(&ops.k, (b * kv * kvh + g) * dk, dk, kv, 1, kvh * dk);
    let (Some(qm), Some(kt)) = (qm, kt) else {
        return Err(view_bug());
    };
    gemm(
        T::ONE,
        qm,
        kt,
        &mut MatMut::row_major(p, q, kv).ok_or_else(view_bug)?,
    );
    T::round_slice(p, call.query_round);
    pass.softmax_rows(
        p,
        kv,
        |i| {
            let mask = MaskRow {
                visible: call.vis.row_range(b, i),
                segment: call.vis.segments(b, i),
                explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
            };
            (call.bias.as_ref().map(|r| r.row(b, h, i)), mask)
        },
        None,
    );
    Ok(())
}

/// The dropout factors of head `bh` (`q × kv`: the multiplier where kept, 0 where dropped),
/// drawn at the same generator positions as the forward's.
pub(super) fn keep_factors<E, B, T: Real>(
    call: &Call<'_, E, B>,
    pass: &RowPass<T>,
    bh: usize,
    rows: std::ops::Range<usize>,
) -> Result<Option<Vec<T>>, AttnError> {
    let Some((plan, base)) = &call.dropout else {
        return Ok(None);
    };
    let kv = call.kv_len;
    let mut keep = try_filled("dropout factors", rows.len() * kv, T::ONE)?;
    for (r, row) in keep.chunks_mut(kv).enumerate() {
        let i = rows.start + r;
        let index = if plan.broadcast {
            i
        } else {
            bh * call.q_len + i
        } * kv;
        let mut rng = base.clone();
        rng.advance(index as u64);
        pass.dropout(row, &mut rng, plan);
    }
    Ok(Some(keep))
}

/// `dS = P ⊙ (dP − rowsum(P ⊙ dP))` for the rows `rows` of head `(b, h)`, in place in `dp`;
/// 0 where the mask hides the logit (Flax's `jnp.where` passes no gradient there).
pub(super) fn softmax_backward<E, B, T: Real>(
    call: &Call<'_, E, B>,
    b: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    p: &[T],
    dp: &mut [T],
    cols: std::ops::Range<usize>,
) {
    let width = cols.len();
    for (r, (pr, dr)) in p.chunks(width).zip(dp.chunks_mut(width)).enumerate() {
        let i = rows.start + r;
        let mut d = T::ZERO;
        for (&x, &y) in pr.iter().zip(dr.iter()) {
            d = d + x * y;
        }
        let mask = MaskRow {
            visible: call.vis.row_range(b, i),
            segment: call.vis.segments(b, i),
            explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
        };
        for (c, (&x, y)) in pr.iter().zip(dr.iter_mut()).enumerate() {
            *y = if mask.keeps(cols.start + c) {
                x * (*y - d)
            } else {
                T::ZERO
            };
        }
    }
}

fn head_backward<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    pass: &RowPass<T>,
    task: Task<'_, T>,
) -> Result<(), AttnError> {
    let (heads, q, kv, dk, dv) = (
        call.heads,
        call.q_len,
        call.kv_len,
        call.qk_depth,
        call.v_depth,
    );
    let bh = task.bh;
    let (b, h) = (bh / heads, bh % heads);
    let (g, kvh) = (call.kv_head(h), call.kv_heads);
    let mut p = try_filled("weights", q * kv, T::ZERO)?;
    head_weights(call, ops, pass, bh, &mut p)?;
    let keep = keep_factors(call, pass, bh, 0..q)?;
    let mut dp = try_filled("grad weights", q * kv, T::ZERO)?;
    if ops.of_weights {
        dp.copy_from_slice(&ops.d[bh * q * kv..][..q * kv]);
    } else {
        let dov = b * q * heads * dv + h * dv;
        let d_out = MatRef::new(&ops.d, dov, q, dv, heads * dv, 1).ok_or_else(view_bug)?;
        let voff = (b * kv * kvh + g) * dv;
        let vt = MatRef::new(&ops.v, voff, dv, kv, 1, kvh * dv).ok_or_else(view_bug)?;
        gemm(
            T::ONE,
            d_out,
            vt,
            &mut MatMut::row_major(&mut dp, q, kv).ok_or_else(view_bug)?,
        );
        // dV_h = P_dᵀ · dO, with the dropped weights as the forward multiplied them.
        let dropped;
        let pd: &[T] = match &keep {
            Some(keep) => {
                let dtype = call.plan.dropped_weights;
                dropped = p
                    .iter()
                    .zip(keep)
                    .map(|(&x, &k)| (x * k).round_to(dtype))
                    .collect::<Vec<T>>();
                &dropped
            }
            None => &p,
        };
        let pt = MatRef::new(pd, 0, kv, q, 1, kv).ok_or_else(view_bug)?;
        gemm(
            T::ONE,
            pt,
            d_out,
            &mut MatMut::row_major(task.dv, kv, dv).ok_or_else(view_bug)?,
        );
    }
    if let Some(keep) = &keep {
        for (y, &k) in dp.iter_mut().zip(keep) {
            *y = *y * k;
        }
    }
    softmax_backward(call, b, h, 0..q, &p, &mut dp, 0..kv);
    let ds = MatRef::row_major(&dp, q, kv).ok_or_else(view_bug)?;
    let koff = (b * kv * kvh + g) * dk;
    let km = MatRef::new(&ops.k, koff, kv, dk, kvh * dk, 1).ok_or_else(view_bug)?;
    let mut dq = task.dq;
    gemm(T::from_f64(call.query_scale), ds, km, &mut dq);
    let dst = MatRef::new(&dp, 0, kv, q, 1, kv).ok_or_else(view_bug)?;
    let qm = MatRef::new(&ops.qs, (b * q * heads + h) * dk, q, dk, heads * dk, 1)
        .ok_or_else(view_bug)?;
    gemm(
        T::ONE,
        dst,
        qm,
        &mut MatMut::row_major(task.dk, kv, dk).ok_or_else(view_bug)?,
    );
    if let Some(dl) = task.dlogits {
        dl.copy_from_slice(&dp);
    }
    Ok(())
}
