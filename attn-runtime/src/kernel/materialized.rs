//! The materialized driver: for each (batch, head), in parallel, the `q × kv` logits matrix by
//! one GEMM, the row pass over each row, the weights written out and/or `P·V` by a second GEMM.
//!
//! Bits do not depend on the thread count: each (batch, head) is computed by one task with the
//! same operations whatever thread runs it, and dropout draws depend only on logical indices.

use rayon::prelude::*;

use super::Call;
use super::gemm::{MatMut, MatRef, gemm, head_blocks_mut};
use super::real::Real;
use super::rowpass::{MaskRow, RowPass};
use crate::array::Array;
use crate::context::Context;
use crate::element::{DType, Element};
use crate::error::{AttnError, try_filled};
use crate::sow::{ATTENTION_WEIGHTS, INTERMEDIATES};

/// Where one (batch, head) task writes `P·V`.
enum OutBlock<'o, O, T> {
    /// Straight into the output (`O` is `T`).
    Direct(MatMut<'o, T>),
    /// Into scratch, then rounded into the output.
    Convert(MatMut<'o, O>),
}

/// One (batch, head) task and the disjoint parts of the results it writes.
struct Task<'o, W, O, T> {
    bh: usize,
    weights: Option<&'o mut [W]>,
    sow: Option<&'o mut [T]>,
    output: Option<OutBlock<'o, O, T>>,
}

/// Per-thread buffers.
struct Scratch<T> {
    logits: Vec<T>,
    query: Vec<T>,
    key: Vec<T>,
    value: Vec<T>,
    output: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new<E: Element, B>(
        call: &Call<'_, E, B>,
        widen: bool,
        convert_out: bool,
    ) -> Result<Self, AttnError> {
        let (q, kv, dk, dv) = (call.q_len, call.kv_len, call.qk_depth, call.v_depth);
        // Products cannot overflow: each is at most the size of a validated tensor.
        let has_value = call.value.is_some();
        Ok(Scratch {
            logits: try_filled("logits scratch", q * kv, T::ZERO)?,
            query: try_filled("query panel", if widen { q * dk } else { 0 }, T::ZERO)?,
            key: try_filled("key panel", if widen { kv * dk } else { 0 }, T::ZERO)?,
            value: try_filled(
                "value panel",
                if widen && has_value { kv * dv } else { 0 },
                T::ZERO,
            )?,
            output: try_filled(
                "output scratch",
                if convert_out { q * dv } else { 0 },
                T::ZERO,
            )?,
        })
    }
}

/// An internal invariant failed (a bug, not a caller error): views are built from validated sizes.
fn view_bug() -> AttnError {
    AttnError::InvalidArgument {
        argument: "kernel",
        reason: "internal error: a strided view does not fit its slice".into(),
    }
}

pub(super) fn run<E: Element, B: Element, W: Element, O: Element, T: Real>(
    call: &Call<'_, E, B>,
    weights: Option<&mut [W]>,
    output: Option<&mut [O]>,
    ctx: &mut Context<'_>,
) -> Result<(), AttnError> {
    let (nb, heads, q, kv) = (call.batch, call.heads, call.q_len, call.kv_len);
    let tasks_n = nb * heads;
    let sow_wanted = ctx.sow.is_some();
    let mut sow_buf: Vec<T> = if sow_wanted {
        try_filled("sown weights", tasks_n * q * kv, T::ZERO)?
    } else {
        Vec::new()
    };
    // No keys: the weights are empty and each output element is an empty sum, 0 (as in Flax).
    let output = match output {
        Some(out) if kv == 0 => {
            out.fill(O::default());
            None
        }
        other => other,
    };
    if tasks_n > 0 && q > 0 && kv > 0 {
        let widen = T::same_slice(call.query).is_none();
        let mut tasks: Vec<Task<'_, W, O, T>> = Vec::new();
        tasks
            .try_reserve_exact(tasks_n)
            .map_err(|_| AttnError::Allocation {
                tensor: "tasks",
                elements: tasks_n,
            })?;
        for bh in 0..tasks_n {
            tasks.push(Task {
                bh,
                weights: None,
                sow: None,
                output: None,
            });
        }
        if let Some(w) = weights {
            for (t, chunk) in tasks.iter_mut().zip(w.chunks_mut(q * kv)) {
                t.weights = Some(chunk);
            }
        }
        if sow_wanted {
            for (t, chunk) in tasks.iter_mut().zip(sow_buf.chunks_mut(q * kv)) {
                t.sow = Some(chunk);
            }
        }
        let mut convert_out = false;
        if let Some(out) = output {
            let dv = call.v_depth;
            if T::same_slice_mut(&mut *out).is_some() {
                let direct = T::same_slice_mut(out).ok_or_else(view_bug)?;
                let blocks = head_blocks_mut(direct, nb, q, heads, dv).ok_or_else(view_bug)?;
                for (t, blk) in tasks.iter_mut().zip(blocks) {
                    t.output = Some(OutBlock::Direct(blk));
                }
            } else {
                convert_out = true;
                let blocks = head_blocks_mut(out, nb, q, heads, dv).ok_or_else(view_bug)?;
                for (t, blk) in tasks.iter_mut().zip(blocks) {
                    t.output = Some(OutBlock::Convert(blk));
                }
            }
        }
        let pass = RowPass::<T>::new(&call.plan);
        ctx.install(|| {
            tasks.into_par_iter().try_for_each_init(
                || Scratch::<T>::new(call, widen, convert_out),
                |scratch, task| {
                    let scratch = scratch.as_mut().map_err(|e| e.clone())?;
                    run_head(call, &pass, scratch, task)
                },
            )
        })?;
    }
    if let Some(sink) = ctx.sow.as_mut() {
        let mut shape = call.batch_shape.clone();
        shape.extend_from_slice(&[heads, q, kv]);
        sink.sow(
            INTERMEDIATES,
            ATTENTION_WEIGHTS,
            to_array(call.plan.weights, &sow_buf, shape)?,
        );
    }
    Ok(())
}

/// The sown weights as an array of `dtype` (the values are already rounded to it).
fn to_array<T: Real>(dtype: DType, values: &[T], shape: Vec<usize>) -> Result<Array, AttnError> {
    fn conv<T: Real, X: Element>(v: &[T]) -> Vec<X> {
        v.iter().map(|x| x.to_elem::<X>()).collect()
    }
    match dtype {
        DType::F64 => Array::new(conv::<T, f64>(values), shape),
        DType::BF16 => Array::new(conv::<T, half::bf16>(values), shape),
        DType::F16 => Array::new(conv::<T, half::f16>(values), shape),
        _ => Array::new(conv::<T, f32>(values), shape),
    }
}

/// Computes one (batch, head).
fn run_head<E: Element, B: Element, W: Element, O: Element, T: Real>(
    call: &Call<'_, E, B>,
    pass: &RowPass<T>,
    scratch: &mut Scratch<T>,
    mut task: Task<'_, W, O, T>,
) -> Result<(), AttnError> {
    let (heads, q, kv) = (call.heads, call.q_len, call.kv_len);
    let (b, h) = (task.bh / heads, task.bh % heads);
    logits(call, b, h, scratch)?;
    let logits = &mut scratch.logits[..q * kv];
    for (i, row) in logits.chunks_mut(kv).enumerate() {
        let mask = MaskRow {
            causal_limit: call.causal.then_some(i),
            explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
        };
        pass.softmax(row, call.bias.as_ref().map(|r| r.row(b, h, i)), mask);
        // Sow before dropout (Flax order).
        if let Some(sow) = task.sow.as_deref_mut() {
            sow[i * kv..(i + 1) * kv].copy_from_slice(row);
        }
        if let Some((plan, base)) = &call.dropout {
            // The row's first element has logical index `index` in the dropout mask
            // (`[q, kv]` when broadcast, else `[batch..., heads, q, kv]`).
            let index = if plan.broadcast { i } else { task.bh * q + i } * kv;
            let mut rng = base.clone();
            rng.advance(index as u64);
            pass.dropout(row, &mut rng, plan);
        }
    }
    if let Some(w) = task.weights {
        for (o, x) in w.iter_mut().zip(logits.iter()) {
            *o = x.to_elem::<W>();
        }
    }
    if let Some(out) = task.output {
        let dv = call.v_depth;
        let p = MatRef::row_major(&scratch.logits[..q * kv], q, kv).ok_or_else(view_bug)?;
        let value = call.value.ok_or_else(view_bug)?;
        let v = match T::same_slice(value) {
            Some(vs) => MatRef::new(vs, b * kv * heads * dv + h * dv, kv, dv, heads * dv, 1),
            None => {
                let panel = &mut scratch.value[..kv * dv];
                for j in 0..kv {
                    let src = (b * kv + j) * heads * dv + h * dv;
                    for (x, e) in panel[j * dv..(j + 1) * dv]
                        .iter_mut()
                        .zip(&value[src..src + dv])
                    {
                        *x = T::from_elem(*e);
                    }
                }
                MatRef::row_major(&scratch.value[..kv * dv], kv, dv)
            }
        }
        .ok_or_else(view_bug)?;
        match out {
            OutBlock::Direct(mut c) => gemm(T::ONE, p, v, &mut c),
            OutBlock::Convert(mut c) => {
                let buf = &mut scratch.output[..q * dv];
                gemm(
                    T::ONE,
                    p,
                    v,
                    &mut MatMut::row_major(buf, q, dv).ok_or_else(view_bug)?,
                );
                for i in 0..c.rows() {
                    let cols = c.cols();
                    c.write_row(
                        i,
                        buf[i * cols..(i + 1) * cols]
                            .iter()
                            .map(|x| x.to_elem::<O>()),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Fills `scratch.logits` (`q × kv`) with the scaled logits of (b, h), rounded to the
/// computation dtype: straight from the strided inputs when `E` is the arithmetic type (the
/// scale is GEMM's alpha), else from widened panels with the query scaled and rounded as Flax
/// does (`round(q · scale)`) and each logit rounded once.
fn logits<E: Element, B, T: Real>(
    call: &Call<'_, E, B>,
    b: usize,
    h: usize,
    scratch: &mut Scratch<T>,
) -> Result<(), AttnError> {
    let (heads, q, kv, dk) = (call.heads, call.q_len, call.kv_len, call.qk_depth);
    let out = &mut scratch.logits[..q * kv];
    let q_off = b * q * heads * dk + h * dk;
    let k_off = b * kv * heads * dk + h * dk;
    match (T::same_slice(call.query), T::same_slice(call.key)) {
        (Some(qs), Some(ks)) => {
            let a = MatRef::new(qs, q_off, q, dk, heads * dk, 1).ok_or_else(view_bug)?;
            let bt = MatRef::new(ks, k_off, dk, kv, 1, heads * dk).ok_or_else(view_bug)?;
            let mut c = MatMut::row_major(out, q, kv).ok_or_else(view_bug)?;
            gemm(T::from_f64(call.query_scale), a, bt, &mut c);
        }
        _ => {
            let scale = T::from_f64(call.query_scale);
            let compute = call.plan.compute;
            let qp = &mut scratch.query[..q * dk];
            for i in 0..q {
                let src = &call.query[q_off + i * heads * dk..][..dk];
                for (x, e) in qp[i * dk..(i + 1) * dk].iter_mut().zip(src) {
                    *x = (T::from_elem(*e) * scale).round_to(compute);
                }
            }
            let kp = &mut scratch.key[..kv * dk];
            for j in 0..kv {
                let src = &call.key[k_off + j * heads * dk..][..dk];
                for (x, e) in kp[j * dk..(j + 1) * dk].iter_mut().zip(src) {
                    *x = T::from_elem(*e);
                }
            }
            let a = MatRef::row_major(&scratch.query[..q * dk], q, dk).ok_or_else(view_bug)?;
            let bt = MatRef::new(&scratch.key[..kv * dk], 0, dk, kv, 1, dk).ok_or_else(view_bug)?;
            let mut c = MatMut::row_major(out, q, kv).ok_or_else(view_bug)?;
            gemm(T::ONE, a, bt, &mut c);
            for x in out.iter_mut() {
                *x = x.round_to(compute);
            }
        }
    }
    Ok(())
}
