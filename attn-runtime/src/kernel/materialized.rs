//! The materialized driver: tasks of (batch, head, block of queries), in parallel. Each task
//! computes its rows of the `q × kv` logits by one GEMM — straight into the weights output when
//! the weights have the arithmetic type — runs the row pass over each row, then writes the
//! weights (converted if needed), the sown weights and/or its rows of `P·V` by a second GEMM.
//!
//! Bits do not depend on the thread count: the tasks are fixed by the call's sizes alone (see
//! [`query_block_rows`]), each is computed with the same operations whatever thread runs it,
//! and dropout draws depend only on logical indices.

use std::borrow::Cow;

use rayon::prelude::*;

use super::Call;
use super::dot::dot;
use super::gemm::{MatMut, MatRef, gemm, head_blocks_mut};
use super::real::Real;
use super::rowpass::{MaskRow, RowPass};
use crate::array::Array;
use crate::context::Context;
use crate::element::{DType, Element};
use crate::error::{AttnError, try_filled};
use crate::sow::{ATTENTION_WEIGHTS, INTERMEDIATES};

/// Logits elements a task aims at (256 KiB of f32): its rows stay in the core's L2 cache between
/// the GEMM and the row pass.
const BLOCK_ELEMENTS: usize = 64 * 1024;

/// Queries per task for `kv_len` keys: about [`BLOCK_ELEMENTS`] logits, a multiple of 8 rows
/// between 64 (fewer rows would not amortize the GEMM's packing of the keys, which every task
/// repeats) and 256. It depends only on `kv_len`, never on the thread count.
fn query_block_rows(kv_len: usize) -> usize {
    (BLOCK_ELEMENTS / kv_len.max(1)).clamp(64, 256) / 8 * 8
}

/// Where one task writes its rows of the weights.
enum WeightsBlock<'o, W, T> {
    /// Straight into the output (`W` is `T`): the GEMM and the row pass run in place.
    Direct(&'o mut [T]),
    /// Computed in scratch, then converted into the output.
    Convert(&'o mut [W]),
}

/// Where one task writes its rows of `P·V`.
enum OutBlock<'o, O, T> {
    /// Straight into the output (`O` is `T`).
    Direct(MatMut<'o, T>),
    /// Into scratch, then rounded into the output.
    Convert(MatMut<'o, O>),
}

/// One (batch, head, query block) task and the disjoint parts of the results it writes.
struct Task<'o, W, O, T> {
    /// `batch · heads + head`
    bh: usize,
    /// The block's first query.
    first_row: usize,
    /// Queries in the block.
    rows: usize,
    weights: Option<WeightsBlock<'o, W, T>>,
    sow: Option<&'o mut [T]>,
    output: Option<OutBlock<'o, O, T>>,
}

/// Query, key and value in the arithmetic type `T`. The query and value are borrowed when the
/// inputs are `T`, else widened once per call (the query scaled and rounded as Flax does,
/// `round(q · scale)`).
struct Operands<'a, T: Clone> {
    query: Cow<'a, [T]>,
    key: KeyOperand<'a, T>,
    value: Option<Cow<'a, [T]>>,
    /// GEMM's alpha for the logits: the scale for borrowed inputs, 1 for the scaled query.
    alpha: T,
    /// Whether each logit must be rounded to the computation dtype after the GEMM.
    round_logits: bool,
}

/// Queries below which the key is not transposed: the transpose costs one pass over the key,
/// which a GEMM over this few rows cannot repay, so the logits are dot products of key rows
/// read in place instead (decoding is `q_len = 1`).
const TRANSPOSE_MIN_QUERIES: usize = 16;

/// The key in the layout its logits are computed from.
enum KeyOperand<'a, T: Clone> {
    /// `[batch·heads, depth, kv]`: every query block multiplies by the same `kᵀ`, and a
    /// contiguous `kᵀ` makes the GEMM's packing of it a plain copy instead of a gather across
    /// the heads.
    Transposed(Vec<T>),
    /// `[batch, kv, heads, depth]` as given (borrowed) or widened, for short queries: each
    /// logit is one dot product of two contiguous rows.
    Rows(Cow<'a, [T]>),
}

impl<'a, T: Real> Operands<'a, T> {
    fn new<E: Element, B>(call: &Call<'a, E, B>, ctx: &Context<'_>) -> Result<Self, AttnError> {
        let scale = T::from_f64(call.query_scale);
        let compute = call.plan.compute;
        let key = if call.q_len >= TRANSPOSE_MIN_QUERIES {
            KeyOperand::Transposed(transpose_key(call, ctx)?)
        } else {
            KeyOperand::Rows(match T::same_slice(call.key) {
                Some(key) => Cow::Borrowed(key),
                None => Cow::Owned(widen(call.key, "widened key", ctx, T::from_elem)?),
            })
        };
        if let Some(query) = T::same_slice(call.query) {
            return Ok(Operands {
                query: Cow::Borrowed(query),
                key,
                value: call.value.and_then(T::same_slice).map(Cow::Borrowed),
                alpha: scale,
                round_logits: false,
            });
        }
        let query = widen(call.query, "widened query", ctx, |e| {
            (T::from_elem(e) * scale).round_to(compute)
        })?;
        let value = call
            .value
            .map(|v| widen(v, "widened value", ctx, T::from_elem))
            .transpose()?;
        Ok(Operands {
            query: Cow::Owned(query),
            key,
            value: value.map(Cow::Owned),
            alpha: T::ONE,
            round_logits: true,
        })
    }
}

/// The key `[batch, kv, heads, depth]` as `T`, transposed to `[batch·heads, depth, kv]`, one
/// (batch, head) per parallel task.
fn transpose_key<E: Element, B, T: Real>(
    call: &Call<'_, E, B>,
    ctx: &Context<'_>,
) -> Result<Vec<T>, AttnError> {
    let (heads, kv, dk) = (call.heads, call.kv_len, call.qk_depth);
    let mut key_t = try_filled("transposed key", call.key.len(), T::ZERO)?;
    if key_t.is_empty() {
        return Ok(key_t);
    }
    ctx.install(|| {
        key_t
            .par_chunks_mut(dk * kv)
            .enumerate()
            .for_each(|(bh, panel)| {
                let (b, h) = (bh / heads, bh % heads);
                for j in 0..kv {
                    let src = &call.key[((b * kv + j) * heads + h) * dk..][..dk];
                    for (d, &e) in src.iter().enumerate() {
                        panel[d * kv + j] = T::from_elem(e);
                    }
                }
            })
    });
    Ok(key_t)
}

/// `f` applied to every element of `src`, in parallel.
fn widen<E: Element, T: Real>(
    src: &[E],
    tensor: &'static str,
    ctx: &Context<'_>,
    f: impl Fn(E) -> T + Sync,
) -> Result<Vec<T>, AttnError> {
    const CHUNK: usize = 16 * 1024;
    let mut out = try_filled(tensor, src.len(), T::ZERO)?;
    ctx.install(|| {
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(dst, src)| {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = f(*s);
                }
            })
    });
    Ok(out)
}

/// Per-thread buffers of one task's rows.
struct Scratch<T> {
    logits: Vec<T>,
    output: Vec<T>,
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
    let heads_n = nb * heads;
    let sow_wanted = ctx.sow.is_some();
    let mut sow_buf: Vec<T> = if sow_wanted {
        try_filled("sown weights", heads_n * q * kv, T::ZERO)?
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
    if heads_n > 0 && q > 0 && kv > 0 {
        let operands = Operands::<T>::new(call, ctx)?;
        let block_rows = query_block_rows(kv);
        let per_head = q.div_ceil(block_rows);
        let tasks_n = heads_n * per_head;
        let mut tasks: Vec<Task<'_, W, O, T>> = Vec::new();
        tasks
            .try_reserve_exact(tasks_n)
            .map_err(|_| AttnError::Allocation {
                tensor: "tasks",
                elements: tasks_n,
            })?;
        for bh in 0..heads_n {
            for first_row in (0..q).step_by(block_rows) {
                tasks.push(Task {
                    bh,
                    first_row,
                    rows: block_rows.min(q - first_row),
                    weights: None,
                    sow: None,
                    output: None,
                });
            }
        }
        // Each (b, h) owns a contiguous `q × kv` part of the weights (and of the sown weights);
        // its row blocks are consecutive chunks of it, in task order.
        let block_chunks =
            |len: usize| (0..heads_n).flat_map(move |_| chunk_lens(q, block_rows, len));
        let mut weights_direct = false;
        if let Some(w) = weights {
            match T::same_slice_mut(&mut *w) {
                Some(_) => {
                    weights_direct = true;
                    let direct = T::same_slice_mut(w).ok_or_else(view_bug)?;
                    for (t, chunk) in tasks.iter_mut().zip(split(direct, block_chunks(kv))) {
                        t.weights = Some(WeightsBlock::Direct(chunk));
                    }
                }
                None => {
                    for (t, chunk) in tasks.iter_mut().zip(split(w, block_chunks(kv))) {
                        t.weights = Some(WeightsBlock::Convert(chunk));
                    }
                }
            }
        }
        if sow_wanted {
            for (t, chunk) in tasks.iter_mut().zip(split(&mut sow_buf, block_chunks(kv))) {
                t.sow = Some(chunk);
            }
        }
        let mut convert_out = false;
        if let Some(out) = output {
            let dv = call.v_depth;
            if T::same_slice_mut(&mut *out).is_some() {
                let direct = T::same_slice_mut(out).ok_or_else(view_bug)?;
                let blocks =
                    head_blocks_mut(direct, nb, q, heads, dv, block_rows).ok_or_else(view_bug)?;
                for (t, blk) in tasks.iter_mut().zip(blocks) {
                    t.output = Some(OutBlock::Direct(blk));
                }
            } else {
                convert_out = true;
                let blocks =
                    head_blocks_mut(out, nb, q, heads, dv, block_rows).ok_or_else(view_bug)?;
                for (t, blk) in tasks.iter_mut().zip(blocks) {
                    t.output = Some(OutBlock::Convert(blk));
                }
            }
        }
        let pass = RowPass::<T>::new(&call.plan);
        let scratch_logits = if weights_direct { 0 } else { block_rows * kv };
        let scratch_output = if convert_out {
            block_rows * call.v_depth
        } else {
            0
        };
        let operands = &operands;
        ctx.install(|| {
            tasks.into_par_iter().try_for_each_init(
                || -> Result<Scratch<T>, AttnError> {
                    Ok(Scratch {
                        logits: try_filled("logits scratch", scratch_logits, T::ZERO)?,
                        output: try_filled("output scratch", scratch_output, T::ZERO)?,
                    })
                },
                |scratch, task| {
                    let scratch = scratch.as_mut().map_err(|e| e.clone())?;
                    run_block(call, operands, &pass, scratch, task)
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

/// The element counts of the row blocks of one head: `rows` rows of `row_len` elements, in
/// blocks of `block_rows` rows.
fn chunk_lens(rows: usize, block_rows: usize, row_len: usize) -> impl Iterator<Item = usize> {
    (0..rows)
        .step_by(block_rows)
        .map(move |first| block_rows.min(rows - first) * row_len)
}

/// Splits `s` into consecutive chunks of the given lengths.
fn split<T>(mut s: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut chunks = Vec::new();
    for len in lens {
        let rest = std::mem::take(&mut s);
        let (head, tail) = rest.split_at_mut(len.min(rest.len()));
        chunks.push(head);
        s = tail;
    }
    chunks
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

/// Computes one (batch, head, query block).
fn run_block<E: Element, B: Element, W: Element, O: Element, T: Real>(
    call: &Call<'_, E, B>,
    operands: &Operands<'_, T>,
    pass: &RowPass<T>,
    scratch: &mut Scratch<T>,
    task: Task<'_, W, O, T>,
) -> Result<(), AttnError> {
    let (heads, q, kv, dk) = (call.heads, call.q_len, call.kv_len, call.qk_depth);
    let (b, h) = (task.bh / heads, task.bh % heads);
    let (first, rows) = (task.first_row, task.rows);
    let (logits, convert_to) = match task.weights {
        Some(WeightsBlock::Direct(w)) => (w, None),
        Some(WeightsBlock::Convert(w)) => (&mut scratch.logits[..rows * kv], Some(w)),
        None => (&mut scratch.logits[..rows * kv], None),
    };
    // Causal: no query of the block sees a key past its last query, so those logits are not
    // computed (the row pass neither reads them nor needs them, see `RowPass::softmax_rows`).
    let cols = if call.causal {
        kv.min(first + rows)
    } else {
        kv
    };
    let q_off = ((b * q + first) * heads + h) * dk;
    match &operands.key {
        KeyOperand::Transposed(key_t) => {
            let a = MatRef::new(&operands.query, q_off, rows, dk, heads * dk, 1)
                .ok_or_else(view_bug)?;
            let bt = MatRef::new(key_t, task.bh * dk * kv, dk, cols, kv, 1).ok_or_else(view_bug)?;
            gemm(
                operands.alpha,
                a,
                bt,
                &mut MatMut::new(logits, 0, rows, cols, kv, 1).ok_or_else(view_bug)?,
            );
        }
        KeyOperand::Rows(key) => {
            let query_row = |r: usize| &operands.query[q_off + r * heads * dk..][..dk];
            let key_row = |j: usize| &key[((b * kv + j) * heads + h) * dk..][..dk];
            // With `depth = 0` the scale is `1/√0 = ∞` and every logit is the empty sum 0, as
            // in Flax (and in the GEMM branch, which ignores alpha when k = 0).
            let alpha = if dk == 0 { T::ZERO } else { operands.alpha };
            for j in 0..cols {
                let k = key_row(j);
                for (r, row) in logits.chunks_mut(kv).enumerate() {
                    row[j] = alpha * dot(query_row(r), k);
                }
            }
        }
    }
    if operands.round_logits {
        for row in logits.chunks_mut(kv) {
            T::round_slice(&mut row[..cols], call.plan.compute);
        }
    }
    pass.softmax_rows(logits, kv, |r| {
        let i = first + r;
        let mask = MaskRow {
            causal_limit: call.causal.then_some(i),
            explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
        };
        (call.bias.as_ref().map(|r| r.row(b, h, i)), mask)
    });
    // Sow before dropout (Flax order).
    if let Some(sow) = task.sow {
        sow.copy_from_slice(logits);
    }
    if let Some((plan, base)) = &call.dropout {
        for (r, row) in logits.chunks_mut(kv).enumerate() {
            // The row's first element has logical index `index` in the dropout mask
            // (`[q, kv]` when broadcast, else `[batch..., heads, q, kv]`).
            let i = first + r;
            let index = if plan.broadcast { i } else { task.bh * q + i } * kv;
            let mut rng = base.clone();
            rng.advance(index as u64);
            pass.dropout(row, &mut rng, plan);
        }
    }
    if let Some(w) = convert_to {
        match T::as_f32_mut(logits) {
            Some(values) => W::from_f32_slice(w, values),
            None => {
                for (o, x) in w.iter_mut().zip(logits.iter()) {
                    *o = x.to_elem::<W>();
                }
            }
        }
    }
    if let Some(out) = task.output {
        let dv = call.v_depth;
        let p = MatRef::row_major(logits, rows, kv).ok_or_else(view_bug)?;
        let value = operands.value.as_deref().ok_or_else(view_bug)?;
        let v_off = b * kv * heads * dv + h * dv;
        let v = MatRef::new(value, v_off, kv, dv, heads * dv, 1).ok_or_else(view_bug)?;
        match out {
            OutBlock::Direct(mut c) => gemm(T::ONE, p, v, &mut c),
            OutBlock::Convert(mut c) => {
                let buf = &mut scratch.output[..rows * dv];
                gemm(
                    T::ONE,
                    p,
                    v,
                    &mut MatMut::row_major(buf, rows, dv).ok_or_else(view_bug)?,
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
