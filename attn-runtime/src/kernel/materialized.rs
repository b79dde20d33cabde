//! The materialized driver: tasks of (batch, head, block of queries), in parallel. Each task
//! computes its rows of the `q × kv` logits by one GEMM — straight into the weights output when
//! the weights have the arithmetic type — runs the row pass over each row, then writes the
//! weights (converted if needed), the sown weights and/or its rows of `P·V` by a second GEMM.
//!
//! Bits do not depend on the thread count: the tasks are fixed by the call's sizes alone (see
//! [`query_block_rows`]), each is computed with the same operations whatever thread runs it,
//! and dropout draws depend only on logical indices.

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;

use super::call::Call;
use super::dot::dot;
use super::exp::MulAdd;
use super::gemm::{MatMut, MatRef, gemm, head_blocks_mut};
use super::isa::{self, Body, Isa, Product};
use super::real::{Real, SPARE_MAX_BYTES};
use super::round::{Narrow, ToBf16, ToF16};
use super::rowpass::{MaskRow, RowPass};
use super::transpose::{TRANSPOSE_TILE, transpose_tile, transpose_tile_f32, transpose_tile_u32};
use crate::array::Array;
use crate::context::{Context, Threads};
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
    /// `[batch·heads, kv / 64, depth, 64]` (the last panel padded): `kᵀ` in panels of
    /// [`KEY_PANEL`] keys for the AVX-512 product. A panel is contiguous, so it stays in L1
    /// while it is used; rows of one `[depth, kv]` matrix lie a power of two apart in common
    /// shapes and would all fall into the same few cache sets.
    Panels(Vec<T>),
    /// As [`KeyOperand::Panels`], but each task lays out the panels of its own head, in its
    /// thread's spare buffer: when a head is one task (`q_len` ≤ one query block), no task
    /// would read another's panels, and the call needs no parallel step before its tasks.
    PanelsPerTask,
    /// `[batch, kv, heads, depth]` as given, for short queries: each logit is one dot product
    /// of two contiguous rows. `None`: the key's elements are not `T` (bf16 or f16 keys), and
    /// each task widens the rows it reads, one at a time, from the call's key. (Widening the
    /// whole key up front cost a decode step more than its dot products: a 4096-key bf16
    /// decode's weights took 7.5× the f32 time, writing and faulting in a key twice the size.)
    Rows(Option<&'a [T]>),
    /// bf16 inputs on a CPU with bf16 dot products: `kᵀ` as [`KeyOperand::Panels`] but with
    /// pairs of bf16 along the depth, `[batch·heads, kv / 64, depth / 2, 64]`, and the scaled,
    /// rounded query as pairs, `[batch, q, heads, depth / 2]` (see
    /// [`isa::product_bf16_pairs`]). The products are exact in f32, so the logits are the
    /// f32 ones up to the order of the sums.
    Bf16Pairs { key: Vec<u32>, query: Vec<u32> },
}

impl<'a, T: Real> Operands<'a, T> {
    fn new<E: Element, B>(
        call: &Call<'a, E, B>,
        threads: Threads<'_>,
        block_rows: usize,
    ) -> Result<Self, AttnError> {
        let scale = T::from_f64(call.query_scale);
        // (Flax rounds the scaled query and the logits to the computation dtype, jax.nn to
        // the float32 logits dtype.)
        let compute = call.query_round;
        let panels =
            Isa::detect().has_avx512() && call.qk_depth > 0 && T::as_f32(&[T::ZERO]).is_some();
        // bf16 inputs on a CPU with bf16 products (never the borrowed-query case below: a bf16
        // query is not `T`).
        let bf16_key = E::as_bf16_bits(call.key).filter(|_| {
            call.q_len >= TRANSPOSE_MIN_QUERIES
                && panels
                && Isa::detect() == Isa::Avx512Bf16
                && compute == DType::BF16
        });
        let plain_key = || -> Result<KeyOperand<'a, T>, AttnError> {
            Ok(
                if call.q_len >= TRANSPOSE_MIN_QUERIES && panels && call.q_len <= block_rows {
                    KeyOperand::PanelsPerTask
                } else if call.q_len >= TRANSPOSE_MIN_QUERIES && panels {
                    KeyOperand::Panels(transpose_key(call, threads, KEY_PANEL)?)
                } else if call.q_len >= TRANSPOSE_MIN_QUERIES {
                    KeyOperand::Transposed(transpose_key(call, threads, call.kv_len)?)
                } else {
                    KeyOperand::Rows(T::same_slice(call.key))
                },
            )
        };
        if let Some(query) = T::same_slice(call.query) {
            return Ok(Operands {
                query: Cow::Borrowed(query),
                key: plain_key()?,
                value: call.value.and_then(T::same_slice).map(Cow::Borrowed),
                alpha: scale,
                round_logits: false,
            });
        }
        let query = widen(call.query, "widened query", threads, scale, Some(compute))?;
        let value = call
            .value
            .map(|v| widen(v, "widened value", threads, T::ONE, None))
            .transpose()?;
        let key = match (bf16_key, T::as_f32(&query)) {
            (Some(key_bits), Some(scaled)) => KeyOperand::Bf16Pairs {
                key: key_pair_panels(call, key_bits, threads)?,
                query: query_pairs(scaled, call.qk_depth, threads)?,
            },
            _ => plain_key()?,
        };
        Ok(Operands {
            query: Cow::Owned(query),
            key,
            value: value.map(Cow::Owned),
            alpha: T::ONE,
            round_logits: true,
        })
    }
}

/// The key `[batch, kv, heads, depth]` as `T`, transposed to panels of `width` keys,
/// `[batch·heads, kv / width, depth, width]` (the last panel padded to `width`; `width = kv`
/// gives `[batch·heads, depth, kv]`), one (batch, head) per parallel task, in this thread's
/// spare buffer [`SPARE_KEY`]. `width` is a multiple of [`TRANSPOSE_TILE`] or `kv`.
fn transpose_key<E: Element, B, T: Real>(
    call: &Call<'_, E, B>,
    threads: Threads<'_>,
    width: usize,
) -> Result<Vec<T>, AttnError> {
    // One layout per key/value head: query heads of a group share it.
    let (heads, kv, dk) = (call.kv_heads, call.kv_len, call.qk_depth);
    let head_len = kv.div_ceil(width) * width * dk;
    let len = (call.batch * heads)
        .checked_mul(head_len)
        .ok_or(AttnError::Allocation {
            tensor: "transposed key",
            elements: usize::MAX,
        })?;
    let mut key_t = spare_buffer(SPARE_KEY, "transposed key", len)?;
    if key_t.is_empty() {
        return Ok(key_t);
    }
    let isa = Isa::detect();
    threads.for_each(
        key_t.chunks_mut(head_len).enumerate().collect(),
        |(bh, panels)| {
            let input = TransposeInput {
                key: call.key,
                panels,
                width,
                b: bh / heads,
                h: bh % heads,
                heads,
                kv,
                dk,
            };
            isa::with_features::<TransposeHead<'_, E, T>>(isa, input)
        },
    );
    Ok(key_t)
}

/// What [`TransposeHead`] works on: the key and the `[kv / width, depth, width]` panels of
/// head `(b, h)`.
struct TransposeInput<'s, E, T> {
    key: &'s [E],
    panels: &'s mut [T],
    width: usize,
    b: usize,
    h: usize,
    heads: usize,
    kv: usize,
    dk: usize,
}

/// The body [`isa::with_features`] compiles per instruction set: one head of
/// [`transpose_key`], tile by tile through a small buffer on the stack (key rows and rows of
/// the result lie a power of two apart in common shapes and would evict each other from the
/// same cache sets if copied directly). Full tiles have constant bounds, so that their loops
/// vectorize.
struct TransposeHead<'s, E, T>(PhantomData<TransposeInput<'s, E, T>>);

impl<'s, E: Element, T: Real> Body for TransposeHead<'s, E, T> {
    type Input = TransposeInput<'s, E, T>;
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(input: Self::Input) {
        const N: usize = TRANSPOSE_TILE;
        let TransposeInput {
            key,
            panels,
            width,
            b,
            h,
            heads,
            kv,
            dk,
        } = input;
        // Key `j` of the head starts at `key_start(j)`; keys are `stride` apart.
        let key_start = |j: usize| ((b * kv + j) * heads + h) * dk;
        let stride = heads * dk;
        let key_f32 = f32::same_slice(key);
        let mut tile = [[T::ZERO; N]; N];
        let mut tile_f32 = [[0.0f32; N]; N];
        for first_key in (0..kv).step_by(N) {
            // The tile's keys lie in one panel (`width` is a multiple of N, or kv).
            let panel = &mut panels[first_key / width * width * dk..];
            for first_depth in (0..dk).step_by(N) {
                let block = (N.min(kv - first_key), N.min(dk - first_depth));
                let src = key_start(first_key) + first_depth;
                let dst = first_depth * width + first_key % width;
                if let (Some(key), Some(panel)) = (key_f32, T::as_f32_mut(&mut *panel)) {
                    let src = (&key[src..], stride);
                    transpose_tile_f32(&mut tile_f32, block, src, 1.0, &mut panel[dst..], width);
                    continue;
                }
                transpose_tile(
                    &mut tile,
                    block,
                    |j| &key[src + j * stride..],
                    T::from_elem,
                    &mut panel[dst..],
                    width,
                );
            }
        }
    }
}

/// The bf16 key `[batch, kv, heads, depth]` (its bit patterns) as [`KeyOperand::Bf16Pairs`]
/// panels: `[batch·heads, kv / 64, depth / 2, 64]` pairs (a zero after an odd depth, zero keys
/// after the last one), one (batch, head) per parallel task.
fn key_pair_panels<E: Element, B>(
    call: &Call<'_, E, B>,
    key_bits: &[u16],
    threads: Threads<'_>,
) -> Result<Vec<u32>, AttnError> {
    let (heads, kv, dk) = (call.kv_heads, call.kv_len, call.qk_depth);
    let pairs = dk.div_ceil(2);
    let head_len = kv.div_ceil(KEY_PANEL) * KEY_PANEL * pairs;
    let len = (call.batch * heads)
        .checked_mul(head_len)
        .ok_or(AttnError::Allocation {
            tensor: "transposed key",
            elements: usize::MAX,
        })?;
    // Stale values are fine: every pair a product reads is written below.
    let mut panels = spare_pairs(SPARE_KEY, "transposed key", len)?;
    if panels.is_empty() {
        return Ok(panels);
    }
    // With an even depth (and an aligned key), every key row is whole pairs in place.
    let key_pairs = isa::as_u32_pairs(key_bits).filter(|_| dk.is_multiple_of(2));
    threads.for_each(
        panels.chunks_mut(head_len).enumerate().collect(),
        |(bh, head)| {
            let (b, h) = (bh / heads, bh % heads);
            let row = |j: usize| ((b * kv + j) * heads + h) * dk;
            if let Some(key_pairs) = key_pairs {
                // Even depth: a key row is already `pairs` pairs; transpose them in tiles.
                const N: usize = TRANSPOSE_TILE;
                let mut tile = [[0u32; N]; N];
                for first_key in (0..kv).step_by(N) {
                    let panel = &mut head[first_key / KEY_PANEL * KEY_PANEL * pairs..];
                    for first_pair in (0..pairs).step_by(N) {
                        transpose_tile_u32(
                            &mut tile,
                            (N.min(kv - first_key), N.min(pairs - first_pair)),
                            (
                                &key_pairs[row(first_key) / 2 + first_pair..],
                                heads * dk / 2,
                            ),
                            &mut panel[first_pair * KEY_PANEL + first_key % KEY_PANEL..],
                            KEY_PANEL,
                        );
                    }
                }
                return;
            }
            for (j, panel) in (0..kv)
                .step_by(KEY_PANEL)
                .zip(head.chunks_exact_mut(KEY_PANEL * pairs))
            {
                for jj in 0..KEY_PANEL.min(kv - j) {
                    let key_row = &key_bits[row(j + jj)..][..dk];
                    for (p, two) in key_row.chunks(2).enumerate() {
                        let hi = two.get(1).map_or(0, |&x| u32::from(x));
                        panel[p * KEY_PANEL + jj] = u32::from(two[0]) | (hi << 16);
                    }
                }
            }
        },
    );
    Ok(panels)
}

/// The scaled query, already rounded to bf16 (so its top 16 bits are the bf16 value), as pairs
/// along the depth: `[batch, q, heads, depth / 2]` (a zero after an odd depth), in parallel.
fn query_pairs(query: &[f32], depth: usize, threads: Threads<'_>) -> Result<Vec<u32>, AttnError> {
    const ROWS: usize = 1024;
    let pairs = depth.div_ceil(2);
    let mut packed = spare_pairs(
        SPARE_LOGITS,
        "query pairs",
        query.len() / depth.max(1) * pairs,
    )?;
    if depth == 0 {
        return Ok(packed);
    }
    let bits = |x: f32| x.to_bits() >> 16;
    threads.for_each(
        packed
            .chunks_mut(ROWS * pairs)
            .zip(query.chunks(ROWS * depth))
            .collect(),
        |(packed, query)| {
            if depth.is_multiple_of(2) {
                // Rows of whole pairs: the block is one run of pairs.
                for (two, out) in query.chunks_exact(2).zip(packed.iter_mut()) {
                    *out = bits(two[0]) | (two[1].to_bits() & 0xFFFF_0000);
                }
                return;
            }
            for (row, out) in query
                .chunks_exact(depth)
                .zip(packed.chunks_exact_mut(pairs))
            {
                for (two, o) in row.chunks(2).zip(out.iter_mut()) {
                    *o = bits(two[0]) | (two.get(1).map_or(0, |&x| bits(x)) << 16);
                }
            }
        },
    );
    Ok(packed)
}

thread_local! {
    /// This thread's spare buffers of bf16 pairs (slots [`SPARE_KEY`] and [`SPARE_LOGITS`]: the
    /// key panels and the query of [`KeyOperand::Bf16Pairs`]), kept as [`Real::put_spare`]
    /// keeps the arithmetic buffers.
    static SPARE_PAIRS: RefCell<[Vec<u32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// This thread's spare pairs buffer `slot` with `len` elements (stale values).
fn spare_pairs(slot: usize, tensor: &'static str, len: usize) -> Result<Vec<u32>, AttnError> {
    let buffer = SPARE_PAIRS.with(|spare| std::mem::take(&mut spare.borrow_mut()[slot]));
    resized(buffer, tensor, len)
}

/// Keeps `buffer` as this thread's spare pairs buffer `slot`, unless it is larger than
/// [`SPARE_MAX_BYTES`].
fn put_spare_pairs(slot: usize, buffer: Vec<u32>) {
    if buffer.capacity() * size_of::<u32>() <= SPARE_MAX_BYTES {
        SPARE_PAIRS.with(|spare| spare.borrow_mut()[slot] = buffer);
    }
}

/// This thread's spare buffer of the transposed key.
const SPARE_KEY: usize = 0;
/// This thread's spare buffer of a task's logits.
const SPARE_LOGITS: usize = 1;
/// This thread's spare buffer of a task's rows of `P·V`.
const SPARE_OUTPUT: usize = 2;

/// This thread's spare buffer `slot` with `len` elements (stale values: the callers overwrite
/// what they read). Give it back with [`Real::put_spare`].
fn spare_buffer<T: Real>(
    slot: usize,
    tensor: &'static str,
    len: usize,
) -> Result<Vec<T>, AttnError> {
    resized(T::take_spare(slot), tensor, len)
}

/// `buffer` with exactly `len` elements: truncated, or grown (new elements are zero) with the
/// allocation failure reported as an error. Kept elements keep their stale values.
fn resized<T: Clone + Default>(
    mut buffer: Vec<T>,
    tensor: &'static str,
    len: usize,
) -> Result<Vec<T>, AttnError> {
    if buffer.len() < len {
        buffer
            .try_reserve_exact(len - buffer.len())
            .map_err(|_| AttnError::Allocation {
                tensor,
                elements: len,
            })?;
        buffer.resize(len, T::default());
    }
    buffer.truncate(len);
    Ok(buffer)
}

/// `src` widened to `T`, times `scale` and rounded to `round` (when given), in parallel.
fn widen<E: Element, T: Real>(
    src: &[E],
    tensor: &'static str,
    threads: Threads<'_>,
    scale: T,
    round: Option<DType>,
) -> Result<Vec<T>, AttnError> {
    const CHUNK: usize = 16 * 1024;
    let mut out = try_filled(tensor, src.len(), T::ZERO)?;
    let isa = Isa::detect();
    threads.for_each(
        out.chunks_mut(CHUNK).zip(src.chunks(CHUNK)).collect(),
        |(dst, src)| {
            let input = WidenInput {
                src,
                dst,
                scale,
                round,
            };
            isa::with_features::<Widen<'_, E, T>>(isa, input)
        },
    );
    Ok(out)
}

/// What [`Widen`] works on.
struct WidenInput<'s, E, T> {
    src: &'s [E],
    dst: &'s mut [T],
    scale: T,
    round: Option<DType>,
}

/// The body [`isa::with_features`] compiles per instruction set: the loop of [`widen`].
struct Widen<'s, E, T>(PhantomData<(&'s (), E, T)>);

impl<'s, E: Element, T: Real> Body for Widen<'s, E, T> {
    type Input = WidenInput<'s, E, T>;
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(input: Self::Input) {
        let WidenInput {
            src,
            dst,
            scale,
            round,
        } = input;
        #[inline(always)]
        fn each<E: Element, T: Real>(src: &[E], dst: &mut [T], f: impl Fn(T) -> T) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f(T::from_elem(s));
            }
        }
        // The dtype is matched outside the loops, so that each loop is branch-free.
        match round {
            None => each(src, dst, |x| x),
            Some(DType::BF16) => each(src, dst, |x| (x * scale).round_to(DType::BF16)),
            Some(DType::F16) => each(src, dst, |x| (x * scale).round_to(DType::F16)),
            Some(DType::F32) => each(src, dst, |x| (x * scale).round_to(DType::F32)),
            Some(dtype) => each(src, dst, |x| (x * scale).round_to(dtype)),
        }
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
        // One hand-over to the pool for the whole call: the parallel steps inside (the key's
        // layout, the tasks) run on its workers without a round trip each.
        let threads = ctx.threads();
        let sow = sow_wanted.then_some(&mut sow_buf[..]);
        threads.install(|| compute::<E, B, W, O, T>(call, weights, output, sow, threads))?;
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

/// The weights (and `P·V`) of a call with at least one head, query and key (the sown weights
/// into `sow`), on the workers of `threads`: the key in its layout, then one task per
/// (batch, head, query block).
fn compute<E: Element, B: Element, W: Element, O: Element, T: Real>(
    call: &Call<'_, E, B>,
    weights: Option<&mut [W]>,
    output: Option<&mut [O]>,
    sow: Option<&mut [T]>,
    threads: Threads<'_>,
) -> Result<(), AttnError> {
    let (nb, heads, q, kv) = (call.batch, call.heads, call.q_len, call.kv_len);
    let heads_n = nb * heads;
    let block_rows = query_block_rows(kv);
    let operands = Operands::<T>::new(call, threads, block_rows)?;
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
    let block_chunks = |len: usize| (0..heads_n).flat_map(move |_| chunk_lens(q, block_rows, len));
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
    if let Some(sow) = sow {
        for (t, chunk) in tasks.iter_mut().zip(split(sow, block_chunks(kv))) {
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
            let blocks = head_blocks_mut(out, nb, q, heads, dv, block_rows).ok_or_else(view_bug)?;
            for (t, blk) in tasks.iter_mut().zip(blocks) {
                t.output = Some(OutBlock::Convert(blk));
            }
        }
    }
    let pass = RowPass::<T>::new(&call.plan).with_big_neg(call.big_neg);
    let scratch_logits = if weights_direct { 0 } else { block_rows * kv };
    let scratch_output = if convert_out {
        block_rows * call.v_depth
    } else {
        0
    };
    let isa = Isa::detect();
    let scratch_key = match operands.key {
        KeyOperand::PanelsPerTask => kv.div_ceil(KEY_PANEL) * KEY_PANEL * call.qk_depth,
        _ => 0,
    };
    let operands_ref = &operands;
    let result = threads.try_for_each(tasks, |task| {
        let mut logits = spare_buffer(SPARE_LOGITS, "logits scratch", scratch_logits)?;
        let mut output = spare_buffer(SPARE_OUTPUT, "output scratch", scratch_output)?;
        let mut key_panels = spare_buffer(SPARE_KEY, "transposed key", scratch_key)?;
        let input = BlockInput {
            call,
            operands: operands_ref,
            pass: &pass,
            logits: &mut logits,
            output: &mut output,
            key_panels: &mut key_panels,
            task,
        };
        let result = isa::with_features::<BlockBody<'_, '_, '_, E, B, W, O, T>>(isa, input);
        T::put_spare(SPARE_LOGITS, logits);
        T::put_spare(SPARE_OUTPUT, output);
        T::put_spare(SPARE_KEY, key_panels);
        result
    });
    match operands.key {
        KeyOperand::Transposed(key_t) | KeyOperand::Panels(key_t) => T::put_spare(SPARE_KEY, key_t),
        KeyOperand::Bf16Pairs { key, query } => {
            put_spare_pairs(SPARE_KEY, key);
            put_spare_pairs(SPARE_LOGITS, query);
        }
        KeyOperand::Rows(_) | KeyOperand::PanelsPerTask => {}
    }
    result
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

/// What one task works on.
struct BlockInput<'t, 'a, 'o, E, B, W, O, T: Clone> {
    call: &'t Call<'a, E, B>,
    operands: &'t Operands<'a, T>,
    pass: &'t RowPass<T>,
    /// Scratch rows of logits (when the weights are not written in place).
    logits: &'t mut [T],
    /// Scratch rows of `P·V` (when the output is not `T`).
    output: &'t mut [T],
    /// Scratch panels of the task's head of `kᵀ` ([`KeyOperand::PanelsPerTask`]).
    key_panels: &'t mut [T],
    task: Task<'o, W, O, T>,
}

/// The body [`isa::with_features`] compiles per instruction set: [`run_block`], so that its
/// loops (rounding, the row pass, conversions) are vectorized at the CPU's width.
struct BlockBody<'t, 'a, 'o, E, B, W, O, T: Clone>(
    PhantomData<BlockInput<'t, 'a, 'o, E, B, W, O, T>>,
);

impl<'t, 'a: 't, 'o, E: Element, B: Element, W: Element, O: Element, T: Real> Body
    for BlockBody<'t, 'a, 'o, E, B, W, O, T>
{
    type Input = BlockInput<'t, 'a, 'o, E, B, W, O, T>;
    type Output = Result<(), AttnError>;

    #[inline(always)]
    fn run<M: MulAdd>(input: Self::Input) -> Self::Output {
        if let KeyOperand::PanelsPerTask = input.operands.key {
            let call = input.call;
            let heads = call.heads;
            TransposeHead::<E, T>::run::<M>(TransposeInput {
                key: call.key,
                panels: &mut *input.key_panels,
                width: KEY_PANEL,
                b: input.task.bh / heads,
                h: call.kv_head(input.task.bh % heads),
                heads: call.kv_heads,
                kv: call.kv_len,
                dk: call.qk_depth,
            });
        }
        run_block(input)
    }
}

/// Keys per panel of the AVX-512 logits product: the panel of `kᵀ` (`depth × 64` values) stays
/// in L1 while every row of the block is multiplied by it.
const KEY_PANEL: usize = 64;

/// `x ← N(x)` on every value of `rows` (one panel of logits, still in L1).
#[inline(always)]
fn round_panel<'r, N: Narrow>(rows: impl Iterator<Item = &'r mut [f32]>) {
    for row in rows {
        for x in row {
            *x = N::round(*x);
        }
    }
}

/// How many key rows ahead of the dot products the short-query logits prefetch.
const PREFETCH_ROWS: usize = 8;

/// Computes one (batch, head, query block).
#[inline(always)]
fn run_block<E: Element, B: Element, W: Element, O: Element, T: Real>(
    input: BlockInput<'_, '_, '_, E, B, W, O, T>,
) -> Result<(), AttnError> {
    let BlockInput {
        call,
        operands,
        pass,
        logits: scratch_logits,
        output: scratch_output,
        key_panels,
        task,
    } = input;
    let (heads, q, kv, dk) = (call.heads, call.q_len, call.kv_len, call.qk_depth);
    let (b, h) = (task.bh / heads, task.bh % heads);
    // The key/value head of query head `h`, and the index of (b, g) among the layouts of the
    // key per key/value head.
    let (g, kv_heads) = (call.kv_head(h), call.kv_heads);
    let bg = b * kv_heads + g;
    let (first, rows) = (task.first_row, task.rows);
    let (logits, convert_to) = match task.weights {
        Some(WeightsBlock::Direct(w)) => (w, None),
        Some(WeightsBlock::Convert(w)) => (&mut scratch_logits[..rows * kv], Some(w)),
        None => (&mut scratch_logits[..rows * kv], None),
    };
    // Keys past the end of every row's visible range (causal: past the block's last query;
    // kv lengths; windows) are not computed (the row pass neither reads them nor needs them,
    // see `RowPass::softmax_rows`).
    let cols = if call.vis.is_trivial() {
        kv
    } else {
        call.vis.block_range(b, first..first + rows).end
    };
    let q_off = ((b * q + first) * heads + h) * dk;
    // Whether the logits are already scaled and rounded to the computation dtype.
    let rounded = match &operands.key {
        // (Only with `depth > 0`: with `depth = 0` the GEMM below gives the logits, the empty
        // sum 0 whatever the scale.)
        KeyOperand::Panels(_) | KeyOperand::PanelsPerTask => {
            let query = T::as_f32(&operands.query).ok_or_else(view_bug)?;
            // This head's panels, `[kv / 64, depth, 64]`.
            let key_t = match &operands.key {
                KeyOperand::Panels(key_t) => &key_t[bg * kv.div_ceil(KEY_PANEL) * KEY_PANEL * dk..],
                _ => &key_panels[..],
            };
            let key_t = T::as_f32(key_t).ok_or_else(view_bug)?;
            let c = T::as_f32_mut(logits).ok_or_else(view_bug)?;
            let alpha = operands.alpha.to_elem::<f32>();
            for first_key in (0..cols).step_by(KEY_PANEL) {
                let keys = KEY_PANEL.min(cols - first_key);
                let product = Product {
                    a: &query[q_off..],
                    a_row: heads * dk,
                    a_step: 1,
                    b: &key_t[first_key * dk..],
                    b_step: KEY_PANEL,
                    rows,
                    cols: keys,
                    depth: dk,
                    accumulate: false,
                    // (The micro-kernel scales the sums before it stores them.)
                    scale: alpha,
                };
                isa::product_avx512(&product, &mut c[first_key..], kv);
                let panel = c[first_key..].chunks_mut(kv).map(|row| &mut row[..keys]);
                match (operands.round_logits, call.query_round) {
                    (true, DType::BF16) => round_panel::<ToBf16>(panel),
                    (true, DType::F16) => round_panel::<ToF16>(panel),
                    _ => {}
                }
            }
            true
        }
        KeyOperand::Bf16Pairs { key, query } => {
            let c = T::as_f32_mut(logits).ok_or_else(view_bug)?;
            let pairs = dk.div_ceil(2);
            let q_off = ((b * q + first) * heads + h) * pairs;
            for first_key in (0..cols).step_by(KEY_PANEL) {
                let keys = KEY_PANEL.min(cols - first_key);
                let product = Product {
                    a: &query[q_off..],
                    a_row: heads * pairs,
                    a_step: 1,
                    b: &key[(bg * kv.div_ceil(KEY_PANEL) * KEY_PANEL + first_key) * pairs..],
                    b_step: KEY_PANEL,
                    rows,
                    cols: keys,
                    depth: pairs,
                    accumulate: false,
                    // (The query is scaled already.)
                    scale: 1.0,
                };
                isa::product_bf16_pairs(&product, &mut c[first_key..], kv);
                let panel = c[first_key..].chunks_mut(kv).map(|row| &mut row[..keys]);
                round_panel::<ToBf16>(panel);
            }
            true
        }
        KeyOperand::Transposed(key_t) => {
            let a = MatRef::new(&operands.query, q_off, rows, dk, heads * dk, 1)
                .ok_or_else(view_bug)?;
            let bt = MatRef::new(key_t, bg * dk * kv, dk, cols, kv, 1).ok_or_else(view_bug)?;
            gemm(
                operands.alpha,
                a,
                bt,
                &mut MatMut::new(logits, 0, rows, cols, kv, 1).ok_or_else(view_bug)?,
            );
            false
        }
        KeyOperand::Rows(key) => {
            let query_row = |r: usize| &operands.query[q_off + r * heads * dk..][..dk];
            let key_at = |j: usize| ((b * kv + j) * kv_heads + g) * dk;
            // With `depth = 0` the scale is `1/√0 = ∞` and every logit is the empty sum 0, as
            // in Flax (and in the GEMM branch, which ignores alpha when k = 0).
            let alpha = if dk == 0 { T::ZERO } else { operands.alpha };
            // One key row widened to `T` (bf16 and f16 keys; this loop is compiled for the
            // instruction set, so the widening is vectorized).
            let mut widened = try_filled(
                "widened key row",
                if key.is_none() { dk } else { 0 },
                T::ZERO,
            )?;
            for j in 0..cols {
                // The rows of one head lie `kv_heads · depth` apart: the hardware prefetcher
                // does not run ahead of such a walk, so each row is asked for a few rows early.
                if j + PREFETCH_ROWS < cols {
                    match key {
                        Some(key) => isa::prefetch(&key[key_at(j + PREFETCH_ROWS)..][..dk]),
                        None => isa::prefetch(&call.key[key_at(j + PREFETCH_ROWS)..][..dk]),
                    }
                }
                let k = match key {
                    Some(key) => &key[key_at(j)..][..dk],
                    None => {
                        let narrow = &call.key[key_at(j)..][..dk];
                        for (w, &x) in widened.iter_mut().zip(narrow) {
                            *w = T::from_elem(x);
                        }
                        &widened[..]
                    }
                };
                for (r, row) in logits.chunks_mut(kv).enumerate() {
                    row[j] = alpha * dot(query_row(r), k);
                }
            }
            false
        }
    };
    if operands.round_logits && !rounded {
        for row in logits.chunks_mut(kv) {
            T::round_slice(&mut row[..cols], call.query_round);
        }
    }
    // bf16 weights that nothing reads after the softmax (no sown copy, no dropout, no `P·V`)
    // are stored by the row pass itself, in place of the conversion below.
    let store_bf16 = task.sow.is_none()
        && call.dropout.is_none()
        && task.output.is_none()
        && call.plan.weights == DType::BF16
        && convert_to.as_deref().and_then(W::as_bf16_bits).is_some();
    let (convert_to, bf16_weights) = match convert_to {
        Some(w) if store_bf16 => (None, Some(W::as_bf16_bits_mut(w).ok_or_else(view_bug)?)),
        other => (other, None),
    };
    pass.softmax_rows(
        logits,
        kv,
        |r| {
            let i = first + r;
            let mask = MaskRow {
                visible: call.vis.row_range(b, i),
                segment: call.vis.segments(b, i),
                explicit: call.mask.as_ref().map(|m| m.row(b, h, i)),
            };
            (call.bias.as_ref().map(|r| r.row(b, h, i)), mask)
        },
        bf16_weights,
    );
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
        match T::as_f32(logits) {
            Some(logits) => W::from_f32_slice(w, logits),
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
        let v_off = b * kv * kv_heads * dv + g * dv;
        let v = MatRef::new(value, v_off, kv, dv, kv_heads * dv, 1).ok_or_else(view_bug)?;
        match out {
            OutBlock::Direct(mut c) => gemm(T::ONE, p, v, &mut c),
            OutBlock::Convert(mut c) => {
                let buf = &mut scratch_output[..rows * dv];
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
