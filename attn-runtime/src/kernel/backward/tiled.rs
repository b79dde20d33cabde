//! The tiled backward (FlashAttention-2 style): no `q × kv` matrix. One task per (batch,
//! head); within it, blocks of [`BQ`] queries and [`BK`] keys, keys the structure hides from a
//! whole query block skipped (`Visibility::block_range`).
//!
//! Per query block, a first sweep over its key blocks recomputes each row's logsumexp
//! (online: running maximum and sum) and the output row (with the dropout factors), so
//! `D_i = dO_i · O_i` (= `rowsum(P ⊙ dP)`); the second sweep recomputes `P = exp(x − lse)`
//! (`exp(x − max) / sum`) block by block and accumulates `dV += P_dᵀ dO`, `dQ += scale · dS K`, `dK += dSᵀ Q_s` with
//! `dS = P ⊙ (dP − D)`. A row that sees no key at all is uniform over every key (Flax) and
//! passes gradient to the value only. Memory: blocks and per-row vectors, plus the per-head
//! key/value partial sums of `mod.rs` (and, only with a bias gradient, the logits' gradient).
//! Sums run in loop order, fixed by the shape: the bits never depend on the threads.

use super::super::call::Call;
use super::super::exp::{Unfused, exp_f32};
use super::super::gemm::{MatMut, MatRef, gemm, gemm_add, head_blocks_mut};
use super::super::real::Real;
use super::super::rowpass::{MaskRow, RowPass};
use super::parts::{Partials, RowStats, Widened};
use super::weights::{chunks, view_bug};
use crate::context::Threads;
use crate::element::Element;
use crate::error::{AttnError, try_filled};

/// Queries per block.
const BQ: usize = 128;
/// Keys per block.
const BK: usize = 128;

/// Whether the tiled backward computes this call: output cotangents of calls whose softmax
/// runs in the arithmetic type's range (float64 with `force_fp32_for_softmax` and Flax's
/// `f64::MIN` masked logit gives NaN rows in Flax: the weights path reproduces that).
pub(super) fn supports<E, B>(call: &Call<'_, E, B>) -> bool {
    let f64_in_f32 = call.plan.compute == crate::element::DType::F64
        && call.plan.softmax == crate::element::DType::F32
        && call.big_neg < f64::from(f32::MIN);
    call.value.is_some() && !f64_in_f32
}

struct Task<'o, T> {
    bh: usize,
    dq: MatMut<'o, T>,
    /// `kv × qk_depth`: this head's share of the key gradient.
    dk: MatMut<'o, T>,
    /// `kv × v_depth`
    dv: MatMut<'o, T>,
    dlogits: Option<&'o mut [T]>,
}

/// The partial gradients by the tiled backward.
pub(super) fn run<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    stats: Option<&RowStats<'_, T>>,
    direct: Option<(&mut [T], &mut [T])>,
    want_dlogits: bool,
    threads: Threads<'_>,
) -> Result<Partials<T>, AttnError> {
    let (nb, heads, q, kv) = (call.batch, call.heads, call.q_len, call.kv_len);
    let (dk, dv) = (call.qk_depth, call.v_depth);
    // Without grouped heads a head's key/value gradient is final: the tasks write it in the
    // gradients' own layout `[batch, kv, heads, depth]`; else per query head `[batch, heads,
    // kv, depth]`, summed over each group afterwards.
    let final_layout = call.kv_heads == heads;
    // (`direct`: the caller's key and value gradients, `[batch, kv, heads, depth]`.)
    let (k_len, v_len) = match direct {
        Some(_) => (0, 0),
        None => (nb * heads * kv * dk, nb * heads * kv * dv),
    };
    let mut parts = Partials {
        dq: try_filled("grad query", nb * q * heads * dk, T::ZERO)?,
        dk: try_filled("grad key (per head)", k_len, T::ZERO)?,
        dv: try_filled("grad value (per head)", v_len, T::ZERO)?,
        dlogits: if want_dlogits {
            Some(try_filled("grad logits", nb * heads * q * kv, T::ZERO)?)
        } else {
            None
        },
        dkv_final: final_layout,
    };
    let n = nb * heads;
    let dq_blocks =
        head_blocks_mut(&mut parts.dq, nb, q, heads, dk, q.max(1)).ok_or_else(view_bug)?;
    let (dk_buf, dv_buf, per_head) = match direct {
        Some((k, v)) => (k, v, false),
        None => (&mut parts.dk[..], &mut parts.dv[..], !final_layout),
    };
    let (dk_chunks, dv_chunks) = if per_head {
        (
            head_blocks_mut(dk_buf, n, kv, 1, dk, kv.max(1)),
            head_blocks_mut(dv_buf, n, kv, 1, dv, kv.max(1)),
        )
    } else {
        (
            head_blocks_mut(dk_buf, nb, kv, heads, dk, kv.max(1)),
            head_blocks_mut(dv_buf, nb, kv, heads, dv, kv.max(1)),
        )
    };
    let (dk_chunks, dv_chunks) = (
        dk_chunks.ok_or_else(view_bug)?,
        dv_chunks.ok_or_else(view_bug)?,
    );
    let dl_chunks: Vec<Option<&mut [T]>> = match parts.dlogits.as_deref_mut() {
        Some(d) => chunks(d, n, q * kv).into_iter().map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    };
    let tasks: Vec<Task<'_, T>> = dq_blocks
        .into_iter()
        .zip(dk_chunks)
        .zip(dv_chunks)
        .zip(dl_chunks)
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
    threads.try_for_each(tasks, |task| head_backward(call, ops, stats, &pass, task))?;
    Ok(parts)
}

/// Scratch of one block.
struct Block<T> {
    /// Logits, then weights, `BQ × BK`.
    s: Vec<T>,
    /// Whether each logit is kept by the mask.
    kept: Vec<bool>,
    /// `dO · Vᵀ`, then `dS`.
    dp: Vec<T>,
    /// Dropout factors (empty without dropout).
    keep: Vec<T>,
}

/// The logits of rows `i0..i0 + rows` and keys `j0..j0 + cols` of head `(b, h)` after bias and
/// mask, in the softmax dtype, and which are kept; the dropout factors if any.
#[allow(clippy::too_many_arguments)]
fn logits_block<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    pass: &RowPass<T>,
    (b, h, bh): (usize, usize, usize),
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    blk: &mut Block<T>,
) -> Result<(), AttnError> {
    let (heads, q, kv, dk) = (call.heads, call.q_len, call.kv_len, call.qk_depth);
    let (g, kvh) = (call.kv_head(h), call.kv_heads);
    let qm = MatRef::new(
        &ops.qs,
        ((b * q + i0) * heads + h) * dk,
        rows,
        dk,
        heads * dk,
        1,
    )
    .ok_or_else(view_bug)?;
    let kt = MatRef::new(
        &ops.k,
        ((b * kv + j0) * kvh + g) * dk,
        dk,
        cols,
        1,
        kvh * dk,
    )
    .ok_or_else(view_bug)?;
    let s = &mut blk.s[..rows * cols];
    gemm(
        T::ONE,
        qm,
        kt,
        &mut MatMut::row_major(s, rows, cols).ok_or_else(view_bug)?,
    );
    T::round_slice(s, call.query_round);
    // Without a bias or dense mask, in a softmax of the arithmetic type, a logit is kept as it
    // is or masked by a range of keys: the row's kept keys are a range, no value changes.
    let ranges =
        call.bias.is_none() && call.mask.is_none() && softmax_is_arithmetic::<T, E, B>(call);
    for r in 0..rows {
        let i = i0 + r;
        let mask = MaskRow {
            visible: call.vis.row_range(b, i),
            segment: call.vis.segments(b, i),
            explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
        };
        let kept = &mut blk.kept[r * cols..(r + 1) * cols];
        if ranges && mask.segment.is_none() {
            let lo = mask.visible.start.clamp(j0, j0 + cols) - j0;
            let hi = mask.visible.end.clamp(j0, j0 + cols) - j0;
            kept.fill(false);
            kept[lo..hi.max(lo)].fill(true);
            continue;
        }
        let bias = call.bias.as_ref().map(|m| m.row(b, h, i));
        for c in 0..cols {
            let j = j0 + c;
            let keep = mask.keeps(j);
            blk.kept[r * cols + c] = keep;
            let x = s[r * cols + c];
            s[r * cols + c] = pass.logit(x, bias.map(|r| r.get(j)), keep);
        }
    }
    if let Some((plan, base)) = &call.dropout {
        let keep = &mut blk.keep[..rows * cols];
        keep.fill(T::ONE);
        for (r, row) in keep.chunks_mut(cols).enumerate() {
            let i = i0 + r;
            let index = if plan.broadcast { i } else { bh * q + i } * kv + j0;
            let mut rng = base.clone();
            rng.advance(index as u64);
            pass.dropout(row, &mut rng, plan);
        }
    }
    Ok(())
}

/// Whether rounding to the softmax dtype leaves a value of the arithmetic type `T` unchanged.
fn softmax_is_arithmetic<T: Real, E, B>(call: &Call<'_, E, B>) -> bool {
    let f32_arith = T::as_f32(&[]).is_some();
    match call.plan.softmax {
        crate::element::DType::F32 => f32_arith,
        crate::element::DType::F64 => !f32_arith,
        _ => false,
    }
}

/// `exp(x - lse) · scale` for the kept entries of a row, 0 for the others (the vectorized
/// [`exp_f32`] for `f32`).
fn weights_row<T: Real>(row: &mut [T], kept: &[bool], lse: T, scale: T) {
    if let Some(row) = T::as_f32_mut(row) {
        let (lse, scale) = (lse.to_elem::<f32>(), scale.to_elem::<f32>());
        for (x, &k) in row.iter_mut().zip(kept) {
            *x = if k { *x - lse } else { f32::NEG_INFINITY };
        }
        for x in row.iter_mut() {
            *x = exp_f32::<Unfused>(*x) * scale;
        }
        return;
    }
    for (x, &k) in row.iter_mut().zip(kept) {
        *x = if k { (*x - lse).exp() * scale } else { T::ZERO };
    }
}

/// The key blocks (start, length) the rows `i0..i0 + rows` of batch element `b` may see.
fn key_blocks<E, B>(call: &Call<'_, E, B>, b: usize, rows: std::ops::Range<usize>) -> Vec<usize> {
    let range = if call.vis.is_trivial() {
        0..call.kv_len
    } else {
        call.vis.block_range(b, rows)
    };
    if range.is_empty() {
        return Vec::new();
    }
    (range.start / BK * BK..range.end).step_by(BK).collect()
}

fn head_backward<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    ops: &Widened<'_, T>,
    stats: Option<&RowStats<'_, T>>,
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
    let Task {
        bh,
        mut dq,
        dk: mut dk_acc,
        dv: mut dv_acc,
        mut dlogits,
    } = task;
    let (b, h) = (bh / heads, bh % heads);
    let (g, kvh) = (call.kv_head(h), call.kv_heads);
    let scale = T::from_f64(call.query_scale);
    let mut blk = Block {
        s: try_filled("logits block", BQ * BK, T::ZERO)?,
        kept: try_filled("mask block", BQ * BK, false)?,
        dp: try_filled("grad weights block", BQ * BK, T::ZERO)?,
        keep: try_filled(
            "dropout block",
            if call.dropout.is_some() { BQ * BK } else { 0 },
            T::ZERO,
        )?,
    };
    let mut out = try_filled("output rows", BQ * dv, T::ZERO)?;
    let mut pd = try_filled(
        "dropped weights block",
        if call.dropout.is_some() { BQ * BK } else { 0 },
        T::ZERO,
    )?;
    let mut dq_rows = try_filled("grad query rows", BQ * dk, T::ZERO)?;
    let mut tmp = try_filled("block product", BK.max(BQ) * dk.max(dv), T::ZERO)?;
    let (mut lse, mut sum, mut d) = (vec![T::ZERO; BQ], vec![T::ZERO; BQ], vec![T::ZERO; BQ]);
    let mut seen = [false; BQ];
    let saved = stats.is_some();
    let d_row = |i: usize| ((b * q + i) * heads + h) * dv;
    for i0 in (0..q).step_by(BQ) {
        let rows = BQ.min(q - i0);
        let blocks = key_blocks(call, b, i0..i0 + rows);
        if let Some(st) = stats {
            // Saved by the forward: the weights are `exp(x - lse)`, `D` read from its output;
            // which rows see a key is found in the sweep below.
            for r in 0..rows {
                let n = (b * q + i0 + r) * heads + h;
                lse[r] = T::from_f64(st.lse[n]);
                sum[r] = T::ONE;
                d[r] = st.d[n];
            }
            seen[..rows].fill(false);
        } else {
            // Sweep 1: logsumexp and output rows (online), then D = dO · O.
            let neg_inf = T::from_f64(f64::NEG_INFINITY);
            lse[..rows].fill(neg_inf);
            sum[..rows].fill(T::ZERO);
            seen[..rows].fill(false);
            out[..rows * dv].fill(T::ZERO);
            for &j0 in &blocks {
                let cols = BK.min(kv - j0);
                logits_block(
                    call,
                    ops,
                    pass,
                    (b, h, bh),
                    (i0, rows),
                    (j0, cols),
                    &mut blk,
                )?;
                for r in 0..rows {
                    let row = &mut blk.s[r * cols..(r + 1) * cols];
                    let kept = &blk.kept[r * cols..(r + 1) * cols];
                    let mut m = lse[r];
                    for (&x, &k) in row.iter().zip(kept) {
                        if k && x > m {
                            m = x;
                        }
                    }
                    if !kept.iter().any(|&k| k) {
                        row.fill(T::ZERO);
                        continue;
                    }
                    let rescale = if seen[r] { (lse[r] - m).exp() } else { T::ZERO };
                    seen[r] = true;
                    lse[r] = m;
                    sum[r] = sum[r] * rescale;
                    for o in &mut out[r * dv..(r + 1) * dv] {
                        *o = *o * rescale;
                    }
                    for (c, x) in row.iter_mut().enumerate() {
                        let p = if kept[c] { (*x - m).exp() } else { T::ZERO };
                        sum[r] = sum[r] + p;
                        *x = match call.dropout {
                            Some(_) => p * blk.keep[r * cols + c],
                            None => p,
                        };
                    }
                }
                // out += P_d · V
                let pm = MatRef::row_major(&blk.s, rows, cols).ok_or_else(view_bug)?;
                let vm = MatRef::new(
                    &ops.v,
                    ((b * kv + j0) * kvh + g) * dv,
                    cols,
                    dv,
                    kvh * dv,
                    1,
                )
                .ok_or_else(view_bug)?;
                let t = &mut tmp[..rows * dv];
                gemm(
                    T::ONE,
                    pm,
                    vm,
                    &mut MatMut::row_major(t, rows, dv).ok_or_else(view_bug)?,
                );
                for (o, &x) in out[..rows * dv].iter_mut().zip(t.iter()) {
                    *o = *o + x;
                }
            }
            for r in 0..rows {
                if !seen[r] {
                    continue;
                }
                let inv = sum[r].recip();
                let d_out = &ops.d[d_row(i0 + r)..][..dv];
                let mut acc = T::ZERO;
                for (&o, &x) in out[r * dv..(r + 1) * dv].iter().zip(d_out) {
                    acc = acc + o * inv * x;
                }
                d[r] = acc;
                // From here on `sum` holds 1 / sum: the weights are `exp(x - max) / sum`.
                sum[r] = inv;
            }
            // Rows that see no key: uniform over all keys, gradient to the value only.
            for r in (0..rows).filter(|&r| !seen[r]) {
                uniform_row(call, pass, (b, bh, g), i0 + r, ops, &mut dv_acc)?;
            }
        }
        // Sweep 2: the gradients.
        dq_rows[..rows * dk].fill(T::ZERO);
        for &j0 in &blocks {
            let cols = BK.min(kv - j0);
            logits_block(
                call,
                ops,
                pass,
                (b, h, bh),
                (i0, rows),
                (j0, cols),
                &mut blk,
            )?;
            for r in 0..rows {
                let row = &mut blk.s[r * cols..(r + 1) * cols];
                let kept = &blk.kept[r * cols..(r + 1) * cols];
                if saved {
                    seen[r] |= kept.iter().any(|&k| k);
                }
                if seen[r] {
                    weights_row(row, kept, lse[r], sum[r]);
                } else {
                    row.fill(T::ZERO);
                }
            }
            // dP_d = dO · Vᵀ
            let dom =
                MatRef::new(&ops.d, d_row(i0), rows, dv, heads * dv, 1).ok_or_else(view_bug)?;
            let vt = MatRef::new(
                &ops.v,
                ((b * kv + j0) * kvh + g) * dv,
                dv,
                cols,
                1,
                kvh * dv,
            )
            .ok_or_else(view_bug)?;
            let dp = &mut blk.dp[..rows * cols];
            gemm(
                T::ONE,
                dom,
                vt,
                &mut MatMut::row_major(dp, rows, cols).ok_or_else(view_bug)?,
            );
            // dV += P_dᵀ · dO (P_d: the dropped weights), then dP = dP_d ⊙ keep.
            if call.dropout.is_some() {
                let keep = &blk.keep[..rows * cols];
                for ((o, &p), &k) in pd.iter_mut().zip(&blk.s).zip(keep) {
                    *o = p * k;
                }
                for (x, &k) in blk.dp.iter_mut().zip(keep) {
                    *x = *x * k;
                }
                let dva = &mut dv_acc.sub_rows(j0, cols);
                add_pt_d(&pd[..rows * cols], rows, cols, dom, dva)?;
            } else {
                let dva = &mut dv_acc.sub_rows(j0, cols);
                add_pt_d(&blk.s[..rows * cols], rows, cols, dom, dva)?;
            }
            // dS = P ⊙ (dP − D), 0 where masked.
            for r in 0..rows {
                let span = r * cols..(r + 1) * cols;
                let ds = &mut blk.dp[span.clone()];
                if !seen[r] {
                    ds.fill(T::ZERO);
                    continue;
                }
                let dr = d[r];
                for ((x, &p), &k) in ds.iter_mut().zip(&blk.s[span.clone()]).zip(&blk.kept[span]) {
                    let v = p * (*x - dr);
                    *x = if k { v } else { T::ZERO };
                }
            }
            let ds = MatRef::row_major(&blk.dp, rows, cols).ok_or_else(view_bug)?;
            // dQ += scale · dS · K
            let km = MatRef::new(
                &ops.k,
                ((b * kv + j0) * kvh + g) * dk,
                cols,
                dk,
                kvh * dk,
                1,
            )
            .ok_or_else(view_bug)?;
            gemm_add(
                scale,
                ds,
                km,
                &mut MatMut::row_major(&mut dq_rows[..rows * dk], rows, dk).ok_or_else(view_bug)?,
            );
            // dK += dSᵀ · Q_s
            let dst = MatRef::new(&blk.dp, 0, cols, rows, 1, cols).ok_or_else(view_bug)?;
            let qm = MatRef::new(
                &ops.qs,
                ((b * q + i0) * heads + h) * dk,
                rows,
                dk,
                heads * dk,
                1,
            )
            .ok_or_else(view_bug)?;
            gemm_add(T::ONE, dst, qm, &mut dk_acc.sub_rows(j0, cols));
            if let Some(dl) = dlogits.as_deref_mut() {
                for r in 0..rows {
                    let dst = &mut dl[(i0 + r) * kv + j0..][..cols];
                    dst.copy_from_slice(&blk.dp[r * cols..(r + 1) * cols]);
                }
            }
        }
        if saved {
            for r in (0..rows).filter(|&r| !seen[r]) {
                uniform_row(call, pass, (b, bh, g), i0 + r, ops, &mut dv_acc)?;
            }
        }
        for r in 0..rows {
            dq.write_row(i0 + r, dq_rows[r * dk..(r + 1) * dk].iter().copied());
        }
    }
    Ok(())
}

/// `dV[j0..j0 + cols] += Pᵀ · dO` for one block (`dv_rows`: those `cols` rows of `dV`).
fn add_pt_d<T: Real>(
    p: &[T],
    rows: usize,
    cols: usize,
    dom: MatRef<'_, T>,
    dv_rows: &mut MatMut<'_, T>,
) -> Result<(), AttnError> {
    let pt = MatRef::new(p, 0, cols, rows, 1, cols).ok_or_else(view_bug)?;
    gemm_add(T::ONE, pt, dom, dv_rows);
    Ok(())
}

/// A row that sees no key: its weights are uniform over all `kv` keys (every logit is the
/// masked value), so it adds `keep · dO_i / kv` to every value row and nothing else.
fn uniform_row<E: Element, B: Element, T: Real>(
    call: &Call<'_, E, B>,
    pass: &RowPass<T>,
    (b, bh, _g): (usize, usize, usize),
    i: usize,
    ops: &Widened<'_, T>,
    dv_acc: &mut MatMut<'_, T>,
) -> Result<(), AttnError> {
    let (heads, q, kv, dv) = (call.heads, call.q_len, call.kv_len, call.v_depth);
    let h = bh % heads;
    let d_out = &ops.d[((b * q + i) * heads + h) * dv..][..dv];
    let p = T::from_f64(kv as f64).recip();
    let keep = match &call.dropout {
        Some((plan, base)) => {
            let mut row = try_filled("dropout row", kv, T::ONE)?;
            let index = if plan.broadcast { i } else { bh * q + i } * kv;
            let mut rng = base.clone();
            rng.advance(index as u64);
            pass.dropout(&mut row, &mut rng, plan);
            Some(row)
        }
        None => None,
    };
    let mut row = try_filled("value gradient row", dv, T::ZERO)?;
    for j in 0..kv {
        let w = match &keep {
            Some(k) => p * k[j],
            None => p,
        };
        for (o, &x) in row.iter_mut().zip(d_out) {
            *o = w * x;
        }
        dv_acc.add_to_row(j, &row);
    }
    Ok(())
}
