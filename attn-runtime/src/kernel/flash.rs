//! The output path: tiled online-softmax attention in the manner of FlashAttention.
//!
//! When neither the weights are requested nor sown, the `q_len × kv_len` matrix is never built.
//! Each task takes one block of up to [`QUERY_BLOCK`] query rows of one batch element, keeps the
//! running state of every head, and walks the keys in blocks of [`KEY_BLOCK`] (the keys of all
//! heads of a block are one contiguous stretch of memory). Per head and key block:
//!
//! 1. `Sᵀ = K_blk · Q_blkᵀ` (keys as rows, queries as contiguous columns) with the query block
//!    packed once, scaled and transposed; keys are read in place (`f32`) or widened per block
//!    (`bf16`, `f16`);
//! 2. bias added, masked logits replaced by `finfo(dtype).min` (Flax's `big_neg`), exactly as
//!    the weights path does;
//! 3. online softmax per query: running maximum `m`, running sum `l`, the accumulator rescaled
//!    by `exp(m_old - m_new)`; dropout multiplies the probabilities after they are summed
//!    (Flax sums before dropout too);
//! 4. `O += P · V_blk`.
//!
//! With grouped key/value heads (`kv_heads < heads`), query head `h` reads key/value head
//! `h / (heads / kv_heads)` in place: K and V are never copied or repeated.
//!
//! A single query row (decoding) is a matrix–vector product: such tasks cover a group of heads
//! and read keys and values row by row in memory order instead ([`single_row_block`]).
//!
//! Keys that a mask removes for every row of a task (outside the range the structured terms of
//! [`Visibility`] leave to its rows: above a causal diagonal, outside a window, past a kv length,
//! every key for padded query rows; or a block on which an explicit mask is false, found from
//! the mask's block summary [`MaskBlocks`] built once per call, which also spares reading the
//! mask in blocks it leaves entirely visible) are skipped. A skipped entry would have weight
//! `exp(big_neg - m) = 0` unless the whole row is masked; for such rows Flax returns uniform
//! weights over *all* keys, so the skipped keys are added back with weight 1 at the end.
//!
//! Scratch is one per thread, `O(heads · depth · QUERY_BLOCK + KEY_BLOCK · QUERY_BLOCK)`,
//! independent of `q_len × kv_len`. Tasks run in parallel with rayon; block boundaries depend
//! on the shape only and every output row is computed by the same sequence of operations
//! whatever the thread count, so results are bit-identical for any number of threads.
//!
//! Arithmetic is `f32` for `f32`, `bf16` and `f16` inputs and `f64` when Flax computes in
//! `f64`. The conformance tolerances were calibrated against exact math, so computing 16-bit
//! softmaxes in `f32` stays inside them (see `conformance/README.md`, "How the tolerances were
//! chosen"); `tests/conformance_output_path.rs` checks every case.

use std::ops::{Add, Mul, Range, Sub};

use rand_core::RngCore;
use rand_pcg::Pcg32;

use super::Call;
use super::broadcast::Resolved;
use super::dot::{Dot, dot};
use super::exp::{MulAdd, Unfused, exp_f32};
use super::isa::{self, Body, Isa, Product, TileScalar};
use super::mask_blocks::{BlockClass, MaskBlocks};
use super::round::bf16_bits;
use super::transpose::{TRANSPOSE_TILE, transpose_tile, transpose_tile_f32, transpose_tile_u32};
use super::visibility::Visibility;
use crate::context::Threads;
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements};

/// Query rows per task (fewer when that would leave fewer than [`MIN_TASKS`] tasks). Each task
/// reads the keys and values of its batch element once, so larger blocks read them less often.
pub(crate) const QUERY_BLOCK: usize = 128;
/// Query rows per task under a causal mask: smaller blocks skip more of the keys above the
/// diagonal (at `B = 4, L = 512`, 128 rows were 14% slower than 64 with 2 threads).
const CAUSAL_QUERY_BLOCK: usize = 64;
/// Keys per inner block.
pub(crate) const KEY_BLOCK: usize = 128;
/// The query block shrinks (down to 16 rows) until there are at least this many tasks.
const MIN_TASKS: usize = 4;

/// The arithmetic of the tiled path (`f32` or `f64`).
pub(crate) trait TileReal:
    TileScalar
    + Default
    + Dot
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + 'static
{
    /// 1.
    const ONE: Self;
    /// −∞.
    const NEG_INFINITY: Self;
    /// `self` converted (rounded) to `O`.
    fn to<O: Element>(self) -> O;
    /// The larger of the two; a NaN `other` is ignored (NaN still reaches the result through
    /// `exp(NaN - m)`). A comparison select, not `f32::max`: it compiles to one vector max
    /// instruction where `f32::max`, which also ignores a NaN `self`, takes three.
    fn max(self, other: Self) -> Self;
    /// `1 / self`.
    fn recip(self) -> Self;
    /// `eˣ`.
    fn exp<M: MulAdd>(self) -> Self;
    /// The slice itself when its elements already have this type.
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]>;
    /// The slice itself when its elements already have this type.
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]>;
    /// The slice itself when this type is `f32`.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
    /// `c (=|+=) a · b` (see [`Product`]).
    fn product(isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize);
    /// `c (=|+=) a · b` over `bf16` pairs (see [`isa::product_bf16_pairs`]).
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize);
    /// `out[n · stride] += bias[b, h, i, j0 + n]` for `n < count`.
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    );
    /// Runs `K` compiled for `isa` (`f32`) or portably (`f64`, which has no SIMD kernels).
    fn dispatch<K: Body>(isa: Isa, input: K::Input) -> K::Output;
    /// Calls `f` with this thread's scratch cell for this arithmetic.
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R;
}

impl TileReal for f32 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn to<O: Element>(self) -> O {
        O::from_f32(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn exp<M: MulAdd>(self) -> Self {
        exp_f32::<M>(self)
    }
    #[inline(always)]
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]> {
        E::as_f32_slice(values)
    }
    #[inline(always)]
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]> {
        E::as_f32_slice_mut(values)
    }
    #[inline(always)]
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    #[inline(always)]
    fn product(isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize) {
        if isa.has_avx512() {
            isa::product_avx512(p, c, ldc);
        } else {
            isa::product_portable(p, c, ldc);
        }
    }
    #[inline(always)]
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize) {
        isa::product_bf16_pairs(p, c, ldc);
    }
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    ) {
        bias.add_f32(at, j0, count, out, stride);
    }
    fn dispatch<K: Body>(isa: Isa, input: K::Input) -> K::Output {
        isa::with_features::<K>(isa, input)
    }
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R {
        thread_local! {
            static SCRATCH: ScratchCell<f32> = const {
                std::cell::RefCell::new((Scratch::empty(), Vec::new()))
            };
        }
        SCRATCH.with(f)
    }
}

impl TileReal for f64 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn to<O: Element>(self) -> O {
        O::from_f64(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn exp<M: MulAdd>(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]> {
        E::as_f64_slice(values)
    }
    #[inline(always)]
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]> {
        E::as_f64_slice_mut(values)
    }
    #[inline(always)]
    fn as_f32_mut(_values: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn product(_isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize) {
        isa::product_portable(p, c, ldc);
    }
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize) {
        isa::product_bf16_pairs_portable(p, c, ldc);
    }
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    ) {
        bias.add_f64(at, j0, count, out, stride);
    }
    fn dispatch<K: Body>(_isa: Isa, input: K::Input) -> K::Output {
        K::run::<Unfused>(input)
    }
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R {
        thread_local! {
            static SCRATCH: ScratchCell<f64> = const {
                std::cell::RefCell::new((Scratch::empty(), Vec::new()))
            };
        }
        SCRATCH.with(f)
    }
}

/// A bias operand behind a trait object, so that the kernel body is compiled once per input
/// type rather than once per (input, bias) pair.
pub(crate) trait BiasRows: Sync {
    /// Adds `bias[b, h, i, j0 + n]` to `out[n · stride]` for `n < count`.
    fn add_f32(
        &self,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f32],
        stride: usize,
    );
    /// The same in `f64`.
    fn add_f64(
        &self,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f64],
        stride: usize,
    );
}

impl<B: Element> BiasRows for Resolved<'_, B> {
    fn add_f32(
        &self,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let row = self.row(b, h, i);
        for n in 0..count {
            out[n * stride] += row.get(j0 + n).to_f32();
        }
    }
    fn add_f64(
        &self,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [f64],
        stride: usize,
    ) {
        let row = self.row(b, h, i);
        for n in 0..count {
            out[n * stride] += row.get(j0 + n).to_f64();
        }
    }
}

/// Which logits are masked (replaced by `big_neg`).
#[derive(Clone, Debug, Default)]
pub(crate) struct FlashMask<'a> {
    /// The structured terms (causal, window, lengths, segment ids).
    pub vis: Visibility<'a>,
    /// Keep only where this is true (ANDed with `vis`).
    pub explicit: Option<Resolved<'a, bool>>,
    /// The summary of `explicit` by blocks of keys, if built (see [`MaskBlocks`]); without
    /// it every block reads the mask.
    pub explicit_blocks: Option<MaskBlocks>,
}

impl FlashMask<'_> {
    /// Whether the visible keys move with the query row (causal or window, or a mask tensor
    /// that hides whole blocks of keys from some rows): smaller query blocks then skip more
    /// keys.
    fn banded(&self) -> bool {
        self.vis.banded()
            || self
                .explicit_blocks
                .as_ref()
                .is_some_and(MaskBlocks::hides_chunks)
    }
}

/// Dropout of the softmax weights: the keep decision for weight `n` (row-major index over the
/// dropout shape) is `draw_n < threshold`, `draw_n` being the `n`-th `u32` of `rng`; kept
/// weights are multiplied by `multiplier`.
#[derive(Clone, Debug)]
pub(crate) struct FlashDropout {
    /// The generator at draw 0.
    pub rng: Pcg32,
    /// Keep when the draw is below this (`2³²` keeps everything).
    pub threshold: u64,
    /// `1 / keep_probability`, rounded as Flax does in the computation dtype.
    pub multiplier: f64,
    /// One mask shared by every batch element and head (Flax's `broadcast_dropout`).
    pub broadcast: bool,
}

impl FlashDropout {
    /// The keep multipliers (`multiplier` or 0) of weights `(b, h, i, j_start..j_start + n)`,
    /// passed to `apply(index_in_run, multiplier)`.
    #[inline(always)]
    fn for_run<C: TileReal>(
        &self,
        dims: &Dims,
        (b, h, i): (usize, usize, usize),
        j_start: usize,
        n: usize,
        mut apply: impl FnMut(usize, C),
    ) {
        let row = if self.broadcast {
            i
        } else {
            (b * dims.heads + h) * dims.q_len + i
        };
        let mut rng = self.rng.clone();
        rng.advance((row * dims.kv_len + j_start) as u64);
        let keep = C::from_f64(self.multiplier);
        for jj in 0..n {
            let kept = u64::from(rng.next_u32()) < self.threshold;
            apply(jj, if kept { keep } else { C::ZERO });
        }
    }
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Product of the batch dims.
    pub batch: usize,
    /// Query rows.
    pub q_len: usize,
    /// Key/value rows.
    pub kv_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`): query head `h` reads key/value head
    /// `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Depth of queries and keys.
    pub qk_depth: usize,
    /// Depth of values and outputs.
    pub v_depth: usize,
}

impl Dims {
    /// The key/value head that query head `h` reads.
    #[inline(always)]
    pub(crate) fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }
}

/// Everything one output-path call reads. Layouts are Flax's: query `[batch..., q, heads, d]`,
/// key `[batch..., kv, heads, d]`, value `[batch..., kv, heads, dv]`.
pub(crate) struct FlashArgs<'a, E> {
    /// Sizes.
    pub dims: Dims,
    /// Queries.
    pub query: &'a [E],
    /// Keys.
    pub key: &'a [E],
    /// Values.
    pub value: &'a [E],
    /// Queries are multiplied by this before the dot product (Flax: `1 / round(sqrt(d))`).
    pub query_scale: f64,
    /// Added to the logits.
    pub bias: Option<&'a dyn BiasRows>,
    /// Masked logits.
    pub mask: FlashMask<'a>,
    /// What a masked logit becomes: `finfo(computation dtype).min`.
    pub big_neg: f64,
    /// Dropout of the weights, if active.
    pub dropout: Option<FlashDropout>,
    /// Compute in `f64` (some step of Flax's is `f64`) rather than `f32`.
    pub accumulate_f64: bool,
    /// Flax rounds the weights to `bf16` before `P·V` (a `bf16` computation without
    /// `force_fp32_for_softmax`), so the `bf16` products may take the probabilities rounded.
    pub weights_bf16: bool,
}

impl<'a, E: Element> FlashArgs<'a, E> {
    /// The arguments of a validated call of the output function (with the summary of its
    /// mask tensor, whose allocation can fail).
    pub(crate) fn of_call<B: Element>(
        call: &'a Call<'a, E, B>,
        value: &'a [E],
    ) -> Result<Self, AttnError> {
        let explicit_blocks = match &call.mask {
            Some(mask) if call.kv_len > 0 => MaskBlocks::new(mask)?,
            _ => None,
        };
        Ok(FlashArgs {
            dims: Dims {
                batch: call.batch,
                q_len: call.q_len,
                kv_len: call.kv_len,
                heads: call.heads,
                kv_heads: call.kv_heads,
                qk_depth: call.qk_depth,
                v_depth: call.v_depth,
            },
            query: call.query,
            key: call.key,
            value,
            query_scale: call.query_scale,
            bias: call.bias.as_ref().map(|b| b as &dyn BiasRows),
            mask: FlashMask {
                vis: call.vis.clone(),
                explicit: call.mask.clone(),
                explicit_blocks,
            },
            big_neg: call.big_neg,
            dropout: call.dropout.as_ref().map(|(plan, rng)| FlashDropout {
                rng: rng.clone(),
                threshold: plan.threshold,
                multiplier: plan.multiplier,
                broadcast: plan.broadcast,
            }),
            accumulate_f64: call.plan.accumulate_f64(),
            weights_bf16: call.plan.weights == DType::BF16,
        })
    }
}

/// Computes attention into `out` (`[batch..., q_len, heads, v_depth]`) with the instruction set
/// `isa`, on the current rayon pool; with `lse`, also each row's logsumexp `max + ln(sum)` of
/// the masked logits (`[batch..., q_len, heads]`; not computed when `v_depth = 0`).
///
/// Panics if a slice length does not match `args.dims` (the caller validated the shapes). A
/// thread's scratch that cannot grow is `AttnError::Allocation`.
pub(crate) fn flash_attention<E: Element, O: Element>(
    args: &FlashArgs<'_, E>,
    out: &mut [O],
    mut lse: Option<&mut [f64]>,
    isa: Isa,
    threads: Threads<'_>,
) -> Result<(), AttnError> {
    let d = args.dims;
    let rows = d.batch * d.q_len;
    let keys = d.batch * d.kv_len;
    assert_eq!(
        args.query.len(),
        rows * d.heads * d.qk_depth,
        "query length"
    );
    assert_eq!(args.key.len(), keys * d.kv_heads * d.qk_depth, "key length");
    assert_eq!(
        args.value.len(),
        keys * d.kv_heads * d.v_depth,
        "value length"
    );
    assert_eq!(out.len(), rows * d.heads * d.v_depth, "output length");
    if let Some(lse) = lse.as_deref_mut() {
        assert_eq!(lse.len(), rows * d.heads, "lse length");
        // (Kept when `v_depth = 0`, which computes nothing: NaN, not a value.)
        lse.fill(if d.kv_len == 0 {
            f64::NEG_INFINITY
        } else {
            f64::NAN
        });
    }
    if out.is_empty() {
        return Ok(());
    }
    if d.kv_len == 0 {
        // Every output element is an empty sum (Flax gives 0).
        out.fill(O::from_f32(0.0));
        return Ok(());
    }
    if args.accumulate_f64 {
        run::<f64, E, O>(args, out, lse, Isa::Portable, threads)
    } else {
        run::<f32, E, O>(args, out, lse, isa, threads)
    }
}

/// The query block for these sizes: depends on the shape only, never on the thread count.
fn query_block(d: &Dims, causal: bool) -> usize {
    let mut block = if causal {
        CAUSAL_QUERY_BLOCK
    } else {
        QUERY_BLOCK
    };
    while block > 16 && d.batch * d.q_len.div_ceil(block) < MIN_TASKS {
        block /= 2;
    }
    block
}

fn run<C: TileReal, E: Element, O: Element>(
    args: &FlashArgs<'_, E>,
    out: &mut [O],
    lse: Option<&mut [f64]>,
    isa: Isa,
    threads: Threads<'_>,
) -> Result<(), AttnError> {
    let d = args.dims;
    let block = query_block(&d, args.mask.banded());
    let row_len = d.heads * d.v_depth;
    // Tasks: (batch element, first query row, first head, output rows). With one query row
    // (decoding) the output row of a batch element is split by groups of heads instead, so
    // that a small batch still has work for every thread.
    // The logsumexp rows of each task, in task order (`[rows][heads of the task]`).
    let mut lse_chunks: Vec<&mut [f64]> = match lse {
        None => Vec::new(),
        Some(lse) if d.q_len == 1 => {
            let per_group = d
                .heads
                .div_ceil(MIN_TASKS.div_ceil(d.batch).clamp(1, d.heads));
            lse.chunks_mut(d.heads)
                .flat_map(|row| row.chunks_mut(per_group))
                .collect()
        }
        Some(lse) => lse
            .chunks_mut(d.q_len * d.heads)
            .flat_map(|per_batch| per_batch.chunks_mut(block * d.heads))
            .collect(),
    };
    let tasks: Vec<(usize, usize, usize, &mut [O])> = if d.q_len == 1 {
        let groups = MIN_TASKS.div_ceil(d.batch).clamp(1, d.heads);
        let per_group = d.heads.div_ceil(groups);
        out.chunks_mut(row_len)
            .enumerate()
            .flat_map(|(b, row)| {
                row.chunks_mut(per_group * d.v_depth)
                    .enumerate()
                    .map(move |(g, heads)| (b, 0, g * per_group, heads))
            })
            .collect()
    } else {
        out.chunks_mut(d.q_len * row_len)
            .enumerate()
            .flat_map(|(b, per_batch)| {
                per_batch
                    .chunks_mut(block * row_len)
                    .enumerate()
                    .map(move |(qb, rows)| (b, qb * block, 0, rows))
            })
            .collect()
    };
    let mut tasks: Vec<_> = if lse_chunks.is_empty() {
        tasks.into_iter().map(|t| (t, None)).collect()
    } else {
        lse_chunks.reverse();
        tasks.into_iter().map(|t| (t, lse_chunks.pop())).collect()
    };
    if args.mask.banded() {
        // A causal task's cost grows with its last row. The costliest go first and every task
        // can be taken by an idle thread on its own (`with_max_len(1)`), so that the threads
        // end together instead of one finishing the last, longest blocks alone.
        tasks.sort_by_key(|&((_, first_row, _, _), _)| std::cmp::Reverse(first_row));
    }
    threads.try_for_each(tasks, |((b, first_row, first_head, out_rows), lse)| {
        with_thread_scratch::<C, _>(|scratch, converted| {
            scratch.prepare(&d, block)?;
            // The body writes `C`; other output types go through a buffer, so that the body
            // is not compiled once per output type.
            let direct = C::direct_mut(&mut *out_rows).is_some();
            if !direct {
                converted.clear();
                grow(converted, out_rows.len(), C::ZERO)?;
            }
            let out_c = match C::direct_mut(&mut *out_rows) {
                Some(out_c) => out_c,
                None => &mut converted[..],
            };
            let task = Task {
                args,
                b,
                first_row,
                first_head,
                out: out_c,
                lse,
                scratch,
                isa,
            };
            C::dispatch::<TaskBody<'_, '_, C, E>>(isa, task);
            if !direct {
                for (o, &x) in out_rows.iter_mut().zip(converted.iter()) {
                    *o = x.to::<O>();
                }
            }
            Ok(())
        })
    })
}

/// Per-task buffers, reused across the tasks a rayon job runs. The task keeps the state of every
/// head and walks the key blocks in the outer loop: a block of keys of all heads is one
/// contiguous stretch of memory (`[kv, heads, depth]`), so each page of it is touched for all
/// heads at once instead of once per head.
pub(crate) struct Scratch<C> {
    /// Per head: scaled queries, transposed, `[qk_depth][width]`.
    query_t: Vec<C>,
    /// Per head: output accumulator `[rows][v_depth]`.
    acc: Vec<C>,
    /// Per head: running maximum and running sum per query column `[width]`.
    max: Vec<C>,
    sum: Vec<C>,
    /// Per head: ranges of keys skipped because a mask removes them entirely.
    skipped: Vec<Vec<Range<usize>>>,
    /// Logits, then probabilities, of one block, transposed: `[KEY_BLOCK][width]`.
    scores: Vec<C>,
    /// Rescale factor, exponent shift and block maximum of one block `[width]`.
    alpha: Vec<C>,
    shift: Vec<C>,
    block_max: Vec<C>,
    /// Keys and values of one block widened to `C` when they are stored in another type.
    keys: Vec<C>,
    values: Vec<C>,
    /// Explicit mask of one block: `[KEY_BLOCK][rows]`, or `[heads][KEY_BLOCK]` for one row.
    keep: Vec<bool>,
    /// For one row: the heads whose block is not entirely masked.
    active: Vec<bool>,
    /// Operands of the `bf16` products ([`Isa::Avx512Bf16`] with `bf16` inputs).
    pairs: Bf16Pairs,
}

/// `bf16` operands packed in pairs along the summation (see [`isa::product_bf16_pairs`]).
struct Bf16Pairs {
    /// Per head: scaled queries rounded to `bf16`, `[qk_depth / 2][width]`.
    query: Vec<u32>,
    /// Up to [`TRANSPOSE_TILE`] query rows of the task as pairs, `[row][heads][qk_depth / 2]`,
    /// on their way into `query`.
    query_rows: Vec<u32>,
    /// Keys of one block and head, `[cols][qk_depth / 2]`.
    key: Vec<u32>,
    /// Values of one block and head, `[cols / 2][v_depth]`.
    value: Vec<u32>,
    /// Probabilities of one block rounded to `bf16`, `[cols / 2][width]`.
    probs: Vec<u32>,
}

/// Packs a row of `bf16` bit patterns into pairs of consecutive elements (a zero after an odd
/// last one).
#[inline(always)]
fn pack_bf16_pairs(row: &[u16], packed: &mut [u32]) {
    let (whole, last) = row.split_at(row.len() / 2 * 2);
    for (out, two) in packed.iter_mut().zip(whole.chunks_exact(2)) {
        *out = pair(two[0].into(), two[1].into());
    }
    if let (Some(&x), Some(out)) = (last.first(), packed.get_mut(whole.len() / 2)) {
        *out = x.into();
    }
}

/// Two `bf16` values as one pair, `lo` first along the summation.
#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

impl<C: TileReal> Scratch<C> {
    const fn empty() -> Self {
        Self {
            query_t: Vec::new(),
            acc: Vec::new(),
            max: Vec::new(),
            sum: Vec::new(),
            skipped: Vec::new(),
            scores: Vec::new(),
            alpha: Vec::new(),
            shift: Vec::new(),
            block_max: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
            keep: Vec::new(),
            active: Vec::new(),
            pairs: Bf16Pairs {
                query: Vec::new(),
                query_rows: Vec::new(),
                key: Vec::new(),
                value: Vec::new(),
                probs: Vec::new(),
            },
        }
    }

    /// Sizes the buffers for tasks of `block` query rows of a call of sizes `d`. Each task
    /// resets what it reads, so the contents need not be cleared. The sizes follow the
    /// caller's heads and depths: growing is fallible (`AttnError::Allocation`).
    fn prepare(&mut self, d: &Dims, block: usize) -> Result<(), AttnError> {
        // What one task needs: at most `min(block, q_len)` rows, one column wide for a single
        // row (decoding), as `Rows::width` lays them out; not a whole padded block.
        let rows = block.min(d.q_len).max(1);
        let width = if rows == 1 {
            1
        } else {
            rows.next_multiple_of(16)
        };
        let key_rows = KEY_BLOCK.min(d.kv_len);
        let size = |tensor, dims: &[usize]| num_elements(tensor, dims);
        grow(
            &mut self.query_t,
            size("scratch", &[d.heads, d.qk_depth, width])?,
            C::ZERO,
        )?;
        grow(
            &mut self.acc,
            size("scratch", &[d.heads, rows, d.v_depth])?,
            C::ZERO,
        )?;
        let per_head = size("scratch", &[d.heads, width])?;
        grow(&mut self.max, per_head, C::ZERO)?;
        grow(&mut self.sum, per_head, C::ZERO)?;
        grow(&mut self.skipped, d.heads, Vec::new())?;
        let scores = size("scratch", &[key_rows, width.max(d.heads)])?;
        grow(&mut self.scores, scores, C::ZERO)?;
        grow(&mut self.alpha, width, C::ZERO)?;
        grow(&mut self.shift, width, C::ZERO)?;
        grow(&mut self.block_max, width, C::ZERO)?;
        grow(&mut self.active, d.heads, true)
    }
}

/// Grows `v` to at least `len` elements (new ones `value`) with a fallible allocation; a longer
/// `v` is left as it is (the buffers are reused across calls).
fn grow<T: Clone>(v: &mut Vec<T>, len: usize, value: T) -> Result<(), AttnError> {
    if len > v.len() {
        v.try_reserve_exact(len - v.len())
            .map_err(|_| AttnError::Allocation {
                tensor: "scratch",
                elements: len,
            })?;
        v.resize(len, value);
    }
    Ok(())
}

/// The scratch of the current thread for arithmetic `C`, kept between calls: allocating (and
/// page-faulting) a few hundred KiB per call costs more than a small call computes. Its size
/// follows the largest shape this thread has run (`heads × depth × QUERY_BLOCK` elements, not
/// `q_len × kv_len`).
fn with_thread_scratch<C: TileReal, R>(f: impl FnOnce(&mut Scratch<C>, &mut Vec<C>) -> R) -> R {
    C::with_thread_scratch(|cell| match cell.try_borrow_mut() {
        Ok(mut held) => {
            let (scratch, converted) = &mut *held;
            f(scratch, converted)
        }
        // Only if a task ran inside another task on this thread: use a fresh scratch.
        Err(_) => f(&mut Scratch::empty(), &mut Vec::new()),
    })
}

/// A thread's scratch and output-conversion buffer.
pub(crate) type ScratchCell<C> = std::cell::RefCell<(Scratch<C>, Vec<C>)>;

/// One (batch element, query block) task.
struct Task<'t, 'a, C, E> {
    args: &'t FlashArgs<'a, E>,
    b: usize,
    first_row: usize,
    first_head: usize,
    /// `[rows][heads of the task][v_depth]`.
    out: &'t mut [C],
    /// `[rows][heads of the task]`: each row's logsumexp, if wanted.
    lse: Option<&'t mut [f64]>,
    scratch: &'t mut Scratch<C>,
    isa: Isa,
}

/// Where one task works: batch element, first query row, rows, padded width (a multiple of
/// 16: the query columns of the transposed tiles; 1 for a single row), and its heads.
#[derive(Clone, Copy)]
struct Rows {
    b: usize,
    first: usize,
    count: usize,
    width: usize,
    first_head: usize,
    heads: usize,
}

impl Rows {
    fn heads(&self) -> Range<usize> {
        self.first_head..self.first_head + self.heads
    }
}

/// The task body, compiled per instruction set by [`isa::with_features`].
struct TaskBody<'t, 'a, C, E>(std::marker::PhantomData<(&'t (), &'a (), C, E)>);

impl<'t, 'a, C, E> Body for TaskBody<'t, 'a, C, E>
where
    'a: 't,
    C: TileReal,
    E: Element,
{
    type Input = Task<'t, 'a, C, E>;
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(task: Self::Input) {
        let Task {
            args,
            b,
            first_row,
            first_head,
            out,
            mut lse,
            scratch,
            isa,
        } = task;
        let d = args.dims;
        let (count, heads) = if d.q_len == 1 {
            (1, out.len() / d.v_depth)
        } else {
            (out.len() / (d.heads * d.v_depth), d.heads)
        };
        // A single query row (decoding) is laid out one column wide and takes the
        // memory-streaming path; blocks of rows use the tiled products.
        let rows = Rows {
            b,
            first: first_row,
            count,
            width: if count == 1 {
                1
            } else {
                count.next_multiple_of(16)
            },
            first_head,
            heads,
        };
        // bf16 inputs on a CPU with bf16 dot products: the tile products take the inputs as
        // they are (queries, after scaling, and probabilities rounded to bf16 as in Flax).
        let pairs = isa == Isa::Avx512Bf16
            && E::as_bf16_bits(args.key).is_some()
            && count > 1
            && d.qk_depth > 0
            && d.v_depth > 0;
        if pairs {
            pack_query_pairs(args, rows, &mut scratch.pairs);
        } else {
            pack_queries(args, rows, scratch);
        }
        for h in rows.heads() {
            start_head(args, rows, h, scratch);
        }
        // Keys outside this range are invisible to every row of the task (structured terms).
        let visible = if args.mask.vis.is_trivial() {
            0..d.kv_len
        } else {
            args.mask.vis.block_range(b, first_row..first_row + count)
        };
        for j0 in (0..d.kv_len).step_by(KEY_BLOCK) {
            let end = (j0 + KEY_BLOCK).min(d.kv_len);
            let start = j0.max(visible.start).min(end);
            let computed_end = end.min(visible.end).max(start);
            for skip in [j0..start, computed_end..end] {
                if !skip.is_empty() {
                    for skipped in &mut scratch.skipped[rows.heads()] {
                        skipped.push(skip.clone());
                    }
                }
            }
            if computed_end == start {
                continue;
            }
            let keys = start..computed_end;
            if count == 1 {
                single_row_block::<C, E, M>(args, rows, keys, scratch);
            } else {
                for h in rows.heads() {
                    key_block::<C, E, M>(args, rows, h, keys.clone(), scratch, (isa, pairs));
                }
            }
        }
        for h in rows.heads() {
            if !scratch.skipped[h].is_empty() {
                add_back_skipped_keys(args, rows, h, scratch);
            }
            let acc = &scratch.acc[h * count * d.v_depth..(h + 1) * count * d.v_depth];
            let sum = &scratch.sum[h * rows.width..];
            if let Some(lse) = lse.as_deref_mut() {
                let max = &scratch.max[h * rows.width..];
                for r in 0..count {
                    let (m, l) = (max[r].to::<f64>(), sum[r].to::<f64>());
                    lse[r * heads + h - first_head] = m + l.ln();
                }
            }
            for (r, acc_row) in acc.chunks_exact(d.v_depth).enumerate() {
                let inv = sum[r].recip();
                let out_row = &mut out[(r * heads + h - first_head) * d.v_depth..][..d.v_depth];
                for (o, &x) in out_row.iter_mut().zip(acc_row) {
                    *o = x * inv;
                }
            }
        }
    }
}

/// Packs the scaled, transposed queries of every head of the task: `query_t[h][k][r]`, zero in
/// the columns after the task's last row. Tiles of 16 rows × 16 values: a column of `query_t`
/// touches a cache line per value, so filled one query row at a time it left L1 long before
/// the row's next value came.
#[inline(always)]
fn pack_queries<C: TileReal, E: Element>(args: &FlashArgs<'_, E>, rows: Rows, s: &mut Scratch<C>) {
    const N: usize = TRANSPOSE_TILE;
    let d = args.dims;
    let (depth, width) = (d.qk_depth, rows.width);
    let scale = C::from_f64(args.query_scale);
    let heads = rows.heads();
    let row_len = rows.heads * depth;
    let query_t = &mut s.query_t[heads.start * depth * width..heads.end * depth * width];
    // Query row `r` of the task starts at `row_start(r)`; rows are `stride` apart.
    let row_start =
        |r: usize| ((rows.b * d.q_len + rows.first + r) * d.heads + heads.start) * depth;
    let stride = d.heads * depth;
    let query_f32 = f32::direct(args.query);
    let mut tile = [[C::ZERO; N]; N];
    let mut tile_f32 = [[0.0f32; N]; N];
    for first_row in (0..rows.count).step_by(N) {
        for first in (0..row_len).step_by(N) {
            let block = (N.min(rows.count - first_row), N.min(row_len - first));
            let src = row_start(first_row) + first;
            let dst = first * width + first_row;
            if let (Some(query), Some(query_t)) = (query_f32, C::as_f32_mut(&mut *query_t)) {
                let scale = args.query_scale as f32;
                let src = (&query[src..], stride);
                transpose_tile_f32(&mut tile_f32, block, src, scale, &mut query_t[dst..], width);
                continue;
            }
            transpose_tile(
                &mut tile,
                block,
                |j| &args.query[src + j * stride..],
                |q| C::of(q) * scale,
                &mut query_t[dst..],
                width,
            );
        }
    }
    if rows.count < width {
        for column in query_t.chunks_exact_mut(width) {
            column[rows.count..].fill(C::ZERO);
        }
    }
}

/// [`pack_queries`] for the `bf16` products: `pairs.query[h][k / 2][r]`, each scaled query
/// rounded to `bf16` (Flax scales the query in its dtype).
#[inline(always)]
fn pack_query_pairs<E: Element>(args: &FlashArgs<'_, E>, rows: Rows, pairs: &mut Bf16Pairs) {
    const N: usize = TRANSPOSE_TILE;
    let d = args.dims;
    let (depth, width) = (d.qk_depth, rows.width);
    let half_depth = depth.div_ceil(2);
    let row_pairs = d.heads * half_depth;
    let scale = args.query_scale as f32;
    let bits = |x: E| u32::from(bf16_bits(x.to_f32() * scale));
    pairs.query.clear();
    pairs.query.resize(d.heads * half_depth * width, 0);
    pairs.query_rows.resize(N * row_pairs, 0);
    let mut tile = [[0u32; N]; N];
    // 16 rows at a time: paired along each row (a contiguous pass), then transposed 16 × 16.
    for first in (0..rows.count).step_by(N) {
        let count = N.min(rows.count - first);
        for (r, out) in pairs
            .query_rows
            .chunks_exact_mut(row_pairs)
            .take(count)
            .enumerate()
        {
            let start = (rows.b * d.q_len + rows.first + first + r) * d.heads * depth;
            for h in rows.heads() {
                let q = &args.query[start + h * depth..start + (h + 1) * depth];
                let out = &mut out[h * half_depth..(h + 1) * half_depth];
                let (whole, last) = q.split_at(depth / 2 * 2);
                for (o, two) in out.iter_mut().zip(whole.chunks_exact(2)) {
                    *o = pair(bits(two[0]), bits(two[1]));
                }
                if let [x] = last {
                    out[half_depth - 1] = bits(*x);
                }
            }
        }
        for h in rows.heads() {
            for p in (0..half_depth).step_by(N) {
                transpose_tile_u32(
                    &mut tile,
                    (count, N.min(half_depth - p)),
                    (&pairs.query_rows[h * half_depth + p..], row_pairs),
                    &mut pairs.query[(h * half_depth + p) * width + first..],
                    width,
                );
            }
        }
    }
}

/// Resets the running state of head `h`.
#[inline(always)]
fn start_head<C: TileReal, E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let width = rows.width;
    s.max[h * width..(h + 1) * width].fill(C::NEG_INFINITY);
    s.sum[h * width..(h + 1) * width].fill(C::ZERO);
    let per_head = rows.count * d.v_depth;
    s.acc[h * per_head..(h + 1) * per_head].fill(C::ZERO);
    s.skipped[h].clear();
}

/// Folds key block `block` (keys `j0..`) into the running state of head `h`.
#[inline(always)]
fn key_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    keys_range: Range<usize>,
    s: &mut Scratch<C>,
    (isa, bf16_pairs): (Isa, bool),
) {
    let d = args.dims;
    let (depth, v_depth, width, b) = (d.qk_depth, d.v_depth, rows.width, rows.b);
    let (j0, cols) = (keys_range.start, keys_range.len());
    let Scratch {
        query_t,
        acc,
        max,
        sum,
        skipped,
        scores,
        alpha,
        shift,
        block_max,
        keys,
        values,
        keep,
        active: _,
        pairs,
    } = s;

    // An explicit mask that is false on the whole block removes it; one that is true on the
    // whole block is not read (`keep` stays empty).
    keep.clear();
    if let Some(mask) = &args.mask.explicit {
        let class = args.mask.explicit_blocks.as_ref().map(|blocks| {
            let rows = rows.first..rows.first + rows.count;
            blocks.classify(mask, (b, h, rows), keys_range.clone())
        });
        match class {
            Some(BlockClass::Hidden) => {
                skipped[h].push(keys_range);
                return;
            }
            Some(BlockClass::Visible) => {}
            Some(BlockClass::Mixed) | None => {
                keep.resize(cols * rows.count, false);
                let mut any = false;
                for r in 0..rows.count {
                    let row = mask.row(b, h, rows.first + r);
                    for jj in 0..cols {
                        let k = row.get(j0 + jj);
                        any |= k;
                        keep[jj * rows.count + r] = k;
                    }
                }
                if !any {
                    skipped[h].push(keys_range);
                    return;
                }
            }
        }
    }

    // Sᵀ = K_blk · Q_blkᵀ.
    let g = d.kv_head(h);
    let kv_rows = d.kv_heads * depth;
    let key_start = ((b * d.kv_len + j0) * d.kv_heads + g) * depth;
    let scores = &mut scores[..cols * width];
    if bf16_pairs {
        let half_depth = depth.div_ceil(2);
        let key_bits = E::as_bf16_bits(args.key).unwrap_or_default();
        // With an even depth the keys are already pairs in memory; else pack them, padded.
        let (key_pairs, key_row) = match isa::as_u32_pairs(key_bits) {
            Some(all) if depth.is_multiple_of(2) => (&all[key_start / 2..], kv_rows / 2),
            _ => {
                pairs.key.resize(cols * half_depth, 0);
                for (jj, packed) in pairs.key.chunks_exact_mut(half_depth).enumerate() {
                    let row = &key_bits[key_start + jj * kv_rows..][..depth];
                    pack_bf16_pairs(row, packed);
                }
                (&pairs.key[..], half_depth)
            }
        };
        C::product_bf16_pairs(
            &Product {
                a: key_pairs,
                a_row: key_row,
                a_step: 1,
                b: &pairs.query[h * half_depth * width..(h + 1) * half_depth * width],
                b_step: width,
                rows: cols,
                cols: width,
                depth: half_depth,
                accumulate: false,
                scale: 1.0,
            },
            scores,
            width,
        );
    } else {
        let (key_data, key_row) = rows_as(args.key, key_start, kv_rows, depth, cols, keys);
        C::product(
            isa,
            &Product {
                a: key_data,
                a_row: key_row,
                a_step: 1,
                b: &query_t[h * depth * width..(h + 1) * depth * width],
                b_step: width,
                rows: cols,
                cols: width,
                depth,
                accumulate: false,
                scale: 1.0,
            },
            scores,
            width,
        );
    }

    let per_head = rows.count * v_depth;
    softmax_block::<C, E, M>(
        args,
        (rows, h, j0, cols),
        scores,
        keep,
        Running {
            max: &mut max[h * width..(h + 1) * width],
            sum: &mut sum[h * width..(h + 1) * width],
            acc: &mut acc[h * per_head..(h + 1) * per_head],
        },
        (alpha, shift, block_max),
    );
    let acc = &mut acc[h * per_head..(h + 1) * per_head];

    // O += P · V_blk.
    let kv_values = d.kv_heads * v_depth;
    let value_start = ((b * d.kv_len + j0) * d.kv_heads + g) * v_depth;
    if bf16_pairs && args.weights_bf16 {
        let half_cols = cols.div_ceil(2);
        let value_bits = E::as_bf16_bits(args.value).unwrap_or_default();
        let key_bits = E::as_bf16_bits(args.key).unwrap_or_default();
        pairs.probs.resize(half_cols * width, 0);
        pairs.value.resize(half_cols * v_depth, 0);
        let probs = pairs.probs.chunks_exact_mut(width);
        let values = pairs.value.chunks_exact_mut(v_depth);
        for (t, (probs, values)) in probs.zip(values).enumerate() {
            let (lo, hi) = (2 * t, 2 * t + 1);
            let bits = |p: C| u32::from(bf16_bits(p.to::<f32>()));
            let value_row = |j: usize| &value_bits[value_start + j * kv_values..][..v_depth];
            if hi < cols {
                let (p_lo, p_hi) = (
                    &scores[lo * width..][..width],
                    &scores[hi * width..][..width],
                );
                for ((out, &a), &b) in probs.iter_mut().zip(p_lo).zip(p_hi) {
                    *out = pair(bits(a), bits(b));
                }
                for ((out, &a), &b) in values.iter_mut().zip(value_row(lo)).zip(value_row(hi)) {
                    *out = pair(a.into(), b.into());
                }
                // The next head's rows of this block, while this head's wait on memory: its
                // keys and values are read next, right after the product below.
                if h + 1 < d.heads && d.kv_head(h + 1) != g {
                    for j in [lo, hi] {
                        let next_value = value_start + v_depth + j * kv_values;
                        isa::prefetch(&value_bits[next_value..][..v_depth]);
                        isa::prefetch(&key_bits[key_start + depth + j * kv_rows..][..depth]);
                    }
                }
            } else {
                for (out, &a) in probs.iter_mut().zip(&scores[lo * width..][..width]) {
                    *out = bits(a);
                }
                for (out, &a) in values.iter_mut().zip(value_row(lo)) {
                    *out = a.into();
                }
            }
        }
        C::product_bf16_pairs(
            &Product {
                a: &pairs.probs,
                a_row: 1,
                a_step: width,
                b: &pairs.value,
                b_step: v_depth,
                rows: rows.count,
                cols: v_depth,
                depth: half_cols,
                accumulate: true,
                scale: 1.0,
            },
            acc,
            v_depth,
        );
        return;
    }
    let (value_data, value_row) =
        rows_as(args.value, value_start, kv_values, v_depth, cols, values);
    C::product(
        isa,
        &Product {
            a: scores,
            a_row: 1,
            a_step: width,
            b: value_data,
            b_step: value_row,
            rows: rows.count,
            cols: v_depth,
            depth: cols,
            accumulate: true,
            scale: 1.0,
        },
        acc,
        v_depth,
    );
}

/// Folds key block `block` (keys `j0..`) into the running state of every head, for a task of a
/// single query row. The products are matrix–vector products, bound by reading K and V, so
/// keys and values are read row by row (all heads of a row are contiguous) in memory order.
#[inline(always)]
fn single_row_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    keys_range: Range<usize>,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let (depth, v_depth) = (d.qk_depth, d.v_depth);
    let task_heads = rows.heads();
    let (j0, cols) = (keys_range.start, keys_range.len());
    // Row stride of `scores` (heads × keys here); the scratch holds `min(KEY_BLOCK, kv_len)` rows
    // of at least `heads` columns.
    let stride = KEY_BLOCK.min(d.kv_len);
    let Scratch {
        query_t,
        acc,
        max,
        sum,
        skipped,
        scores,
        alpha,
        shift,
        block_max,
        keys,
        values,
        keep,
        active,
        pairs: _,
    } = s;

    active.fill(true);
    if let Some(mask) = &args.mask.explicit {
        keep.clear();
        for h in task_heads.clone() {
            let row = mask.row(rows.b, h, rows.first);
            let start = keep.len();
            keep.extend((0..cols).map(|jj| row.get(j0 + jj)));
            if !keep[start..].contains(&true) {
                skipped[h].push(keys_range.clone());
                active[h] = false;
            }
        }
        if !active[task_heads.clone()].contains(&true) {
            return;
        }
    }

    // Logits of every head, key row by key row: scores[h][jj].
    // Four heads at a time (independent sums, each in the order of `dot`: the same bits);
    // inactive heads' logits are computed and never read.
    let key_row_len = d.kv_heads * depth;
    let (quads, rest) = (task_heads.len() / 4, task_heads.len() % 4);
    for jj in 0..cols {
        let start = (rows.b * d.kv_len + j0 + jj) * key_row_len;
        let (key_row, _) = rows_as(args.key, start, key_row_len, key_row_len, 1, keys);
        let query = |h: usize| &query_t[h * depth..(h + 1) * depth];
        let key = |h: usize| {
            let g = d.kv_head(h);
            &key_row[g * depth..(g + 1) * depth]
        };
        for quad in 0..quads {
            let h = rows.first_head + 4 * quad;
            let heads = [h, h + 1, h + 2, h + 3];
            let logits = C::dot4(heads.map(query), heads.map(key));
            for (h, x) in heads.into_iter().zip(logits) {
                scores[h * stride + jj] = x;
            }
        }
        for h in task_heads.end - rest..task_heads.end {
            if active[h] {
                scores[h * stride + jj] = dot(query(h), key(h));
            }
        }
    }

    for h in task_heads.clone() {
        if active[h] {
            let keep_h = if args.mask.explicit.is_none() {
                &[][..]
            } else {
                &keep[(h - rows.first_head) * cols..][..cols]
            };
            softmax_block::<C, E, M>(
                args,
                (rows, h, j0, cols),
                &mut scores[h * stride..h * stride + cols],
                keep_h,
                Running {
                    max: &mut max[h..h + 1],
                    sum: &mut sum[h..h + 1],
                    acc: &mut acc[h * v_depth..(h + 1) * v_depth],
                },
                (&mut alpha[..1], &mut shift[..1], &mut block_max[..1]),
            );
        }
    }

    // acc[h] += Σ_jj p[h][jj] · V[j0 + jj][h], value row by value row.
    let value_row_len = d.kv_heads * v_depth;
    for jj in 0..cols {
        let start = (rows.b * d.kv_len + j0 + jj) * value_row_len;
        let (value_row, _) = rows_as(args.value, start, value_row_len, value_row_len, 1, values);
        for h in task_heads.clone() {
            if active[h] {
                let p = scores[h * stride + jj];
                let g = d.kv_head(h);
                let v = &value_row[g * v_depth..(g + 1) * v_depth];
                for (a, &v) in acc[h * v_depth..(h + 1) * v_depth].iter_mut().zip(v) {
                    *a = *a + p * v;
                }
            }
        }
    }
}

/// The running state of one head: per query row the maximum and sum, and the accumulator
/// `[rows][v_depth]`.
struct Running<'s, C> {
    max: &'s mut [C],
    sum: &'s mut [C],
    acc: &'s mut [C],
}

/// Replaces by `big_neg` the logits of `scores` (`[cols][width]`, keys `j0..j0 + cols`) that
/// the structured terms hide; rows whose visible range covers the block (and that have no
/// segment ids) are left as they are.
#[inline(always)]
fn mask_structured<C: TileReal>(
    vis: &Visibility<'_>,
    (rows, j0, cols): (Rows, usize, usize),
    scores: &mut [C],
    big_neg: C,
) {
    let width = rows.width;
    let block = j0..j0 + cols;
    // Packed sequences: most blocks lie inside one sequence. When every key of the block has
    // the same segment id, a row either shares it (only the other terms mask) or sees none of
    // the block: no id is compared per key.
    let block_segment = vis.segments(rows.b, rows.first).and_then(|(_, keys)| {
        let keys = &keys[block.clone()];
        keys.iter().all(|&k| k == keys[0]).then_some(keys[0])
    });
    for r in 0..rows.count {
        let i = rows.first + r;
        let range = vis.row_range(rows.b, i);
        let mut segment = vis.segments(rows.b, i);
        if let (Some((id, _)), Some(block_id)) = (segment, block_segment) {
            if id != block_id {
                for jj in 0..cols {
                    scores[jj * width + r] = big_neg;
                }
                continue;
            }
            segment = None;
        }
        if segment.is_none() && range.start <= block.start && block.end <= range.end {
            continue;
        }
        for jj in 0..cols {
            let j = j0 + jj;
            let kept = range.contains(&j) && segment.is_none_or(|(id, keys)| keys[j] == id);
            if !kept {
                scores[jj * width + r] = big_neg;
            }
        }
    }
}

/// Adds bias and masks to the transposed logits `scores` (`[cols][width]`, `width` query
/// columns of which `rows.count` are real), turns them into probabilities relative to the
/// updated running maximum, adds them to the running sum, applies dropout and rescales the
/// accumulator. `keep` is the explicit mask of the block (`[cols][rows.count]`), if any.
#[inline(always)]
fn softmax_block<C: TileReal, E: Element, M: MulAdd>(
    args: &FlashArgs<'_, E>,
    (rows, h, j0, cols): (Rows, usize, usize, usize),
    scores: &mut [C],
    keep: &[bool],
    state: Running<'_, C>,
    (alpha, shift, block_max): (&mut [C], &mut [C], &mut [C]),
) {
    let d = args.dims;
    let (width, b) = (rows.width, rows.b);
    let big_neg = C::from_f64(args.big_neg);
    let Running { max, sum, acc } = state;
    // Bias, then masks (a masked logit is replaced, whatever the bias).
    if let Some(bias) = &args.bias {
        for r in 0..rows.count {
            C::add_bias(
                *bias,
                (b, h, rows.first + r),
                j0,
                cols,
                &mut scores[r..],
                width,
            );
        }
    }
    let vis = &args.mask.vis;
    if vis.is_causal_only() {
        // Rows before `j0 + jj` have key `j0 + jj` in their future.
        if j0 + cols - 1 > rows.first {
            for jj in 0..cols {
                let masked_rows = (j0 + jj).saturating_sub(rows.first).min(rows.count);
                scores[jj * width..jj * width + masked_rows].fill(big_neg);
            }
        }
    } else if !vis.is_trivial() {
        mask_structured(vis, (rows, j0, cols), scores, big_neg);
    }
    if !keep.is_empty() {
        for jj in 0..cols {
            for r in 0..rows.count {
                if !keep[jj * rows.count + r] {
                    scores[jj * width + r] = big_neg;
                }
            }
        }
    }

    // Online softmax, vectorized along the query columns.
    let block_max = &mut block_max[..width];
    block_max.fill(C::NEG_INFINITY);
    column_max(scores, width, block_max);
    for r in 0..width {
        let new_max = max[r].max(block_max[r]);
        // A row whose logits so far are all -inf keeps shift 0, so that exp(-inf) = 0
        // instead of exp(-inf - -inf) = NaN.
        let row_shift = if new_max == C::NEG_INFINITY {
            C::ZERO
        } else {
            new_max
        };
        alpha[r] = (max[r] - row_shift).exp::<M>();
        shift[r] = row_shift;
        max[r] = new_max;
        sum[r] = sum[r] * alpha[r];
    }
    exp_and_column_sum::<C, M>(scores, width, &shift[..width], sum);
    if let Some(dropout) = &args.dropout {
        for r in 0..rows.count {
            dropout.for_run::<C>(&d, (b, h, rows.first + r), j0, cols, |jj, keep| {
                let x = &mut scores[jj * width + r];
                *x = *x * keep;
            });
        }
    }
    for (acc_row, &a) in acc.chunks_exact_mut(d.v_depth).zip(alpha.iter()) {
        if a != C::ONE {
            for x in acc_row {
                *x = *x * a;
            }
        }
    }
}

/// Columns that the column passes below hold in registers across all rows of a block (four
/// AVX-512 vectors of `f32`). A pass that went through memory row by row would make every row
/// wait for the previous row's store of the same maxima or sums.
const REGISTER_COLUMNS: usize = 64;
/// The columns of narrower blocks (16-row tasks of short sequences, the widths are multiples
/// of 16): one vector of `f32` at a time, still across all rows.
const VECTOR_COLUMNS: usize = 16;

/// The column chunks `(first column, columns)` of a block `width` columns wide that the column
/// passes take one at a time: [`REGISTER_COLUMNS`] while they fit, then [`VECTOR_COLUMNS`],
/// then single columns (a decoding task's one column).
#[inline(always)]
fn column_chunks(width: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut c0 = 0;
    std::iter::from_fn(move || {
        let n = [REGISTER_COLUMNS, VECTOR_COLUMNS, 1]
            .into_iter()
            .find(|&n| c0 + n <= width)?;
        c0 += n;
        Some((c0 - n, n))
    })
}

/// `max[c] = max(max[c], scores[j][c])` over the rows `j` of `scores` (`width` columns each).
#[inline(always)]
fn column_max<C: TileReal>(scores: &[C], width: usize, max: &mut [C]) {
    #[inline(always)]
    fn columns<C: TileReal, const N: usize>(scores: &[C], width: usize, c0: usize, max: &mut [C]) {
        let mut m: [C; N] = max[c0..c0 + N].try_into().expect("N columns");
        for row in scores.chunks_exact(width) {
            for (m, &x) in m.iter_mut().zip(&row[c0..c0 + N]) {
                *m = m.max(x);
            }
        }
        max[c0..c0 + N].copy_from_slice(&m);
    }
    for (c0, n) in column_chunks(width) {
        match n {
            REGISTER_COLUMNS => columns::<C, REGISTER_COLUMNS>(scores, width, c0, max),
            VECTOR_COLUMNS => columns::<C, VECTOR_COLUMNS>(scores, width, c0, max),
            _ => columns::<C, 1>(scores, width, c0, max),
        }
    }
}

/// `scores[j][c] = exp(scores[j][c] - shift[c])` and `sum[c] += scores[j][c]` over the rows `j`
/// of `scores` in order (`width` columns each).
#[inline(always)]
fn exp_and_column_sum<C: TileReal, M: MulAdd>(
    scores: &mut [C],
    width: usize,
    shift: &[C],
    sum: &mut [C],
) {
    #[inline(always)]
    fn columns<C: TileReal, M: MulAdd, const N: usize>(
        scores: &mut [C],
        width: usize,
        c0: usize,
        shift: &[C],
        sum: &mut [C],
    ) {
        let shift: [C; N] = shift[c0..c0 + N].try_into().expect("N columns");
        let mut l: [C; N] = sum[c0..c0 + N].try_into().expect("N columns");
        for row in scores.chunks_exact_mut(width) {
            for ((x, &m), l) in row[c0..c0 + N].iter_mut().zip(&shift).zip(&mut l) {
                let p = (*x - m).exp::<M>();
                *x = p;
                *l = *l + p;
            }
        }
        sum[c0..c0 + N].copy_from_slice(&l);
    }
    for (c0, n) in column_chunks(width) {
        match n {
            REGISTER_COLUMNS => columns::<C, M, REGISTER_COLUMNS>(scores, width, c0, shift, sum),
            VECTOR_COLUMNS => columns::<C, M, VECTOR_COLUMNS>(scores, width, c0, shift, sum),
            _ => columns::<C, M, 1>(scores, width, c0, shift, sum),
        }
    }
}

/// `count` rows of `row_len` elements of `src`, `row_stride` apart from `start`, as `C`:
/// borrowed with their stride when `src` already is `C`, else widened into `buf` (stride
/// `row_len`). Returns the rows and their stride. Inlined so that the widening loop is
/// compiled (and vectorized) for the instruction set of the task body.
#[inline(always)]
fn rows_as<'s, C: TileReal, E: Element>(
    src: &'s [E],
    start: usize,
    row_stride: usize,
    row_len: usize,
    count: usize,
    buf: &'s mut Vec<C>,
) -> (&'s [C], usize) {
    if let Some(direct) = C::direct(src) {
        let end = match count {
            0 => start,
            _ => start + (count - 1) * row_stride + row_len,
        };
        return (&direct[start..end], row_stride);
    }
    buf.clear();
    for r in 0..count {
        let row = start + r * row_stride;
        buf.extend(src[row..row + row_len].iter().map(|&x| C::of(x)));
    }
    (buf, row_len)
}

/// Rows of head `h` whose every logit was masked (their maximum is `big_neg`, or −∞ when all
/// the logits that were computed are −∞) get weight `exp(big_neg - big_neg) = 1` on every key,
/// including the keys of skipped blocks, which are all masked. The computed part is already in
/// the accumulator and the sum; this adds the skipped keys.
#[inline(never)]
#[cold]
fn add_back_skipped_keys<C: TileReal, E: Element>(
    args: &FlashArgs<'_, E>,
    rows: Rows,
    h: usize,
    s: &mut Scratch<C>,
) {
    let d = args.dims;
    let v_depth = d.v_depth;
    let big_neg = C::from_f64(args.big_neg);
    for r in 0..rows.count {
        let max = &mut s.max[h * rows.width + r];
        let fully_masked = *max <= big_neg;
        if !fully_masked {
            continue;
        }
        // With a maximum of -inf everything computed had weight 0; the masked keys now hold it.
        *max = big_neg;
        for range in &s.skipped[h] {
            let (j0, cols) = (range.start, range.len());
            let mut weights = vec![C::ONE; cols];
            if let Some(dropout) = &args.dropout {
                dropout.for_run::<C>(&d, (rows.b, h, rows.first + r), j0, cols, |jj, keep| {
                    weights[jj] = keep;
                });
            }
            let sum = &mut s.sum[h * rows.width + r];
            *sum = *sum + C::from_f64(cols as f64);
            let acc_row = &mut s.acc[(h * rows.count + r) * v_depth..][..v_depth];
            for (jj, &w) in weights.iter().enumerate() {
                let start = ((rows.b * d.kv_len + j0 + jj) * d.kv_heads + d.kv_head(h)) * v_depth;
                for (a, &v) in acc_row.iter_mut().zip(&args.value[start..start + v_depth]) {
                    *a = *a + w * C::of(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Dense float64 reference with Flax's semantics (FLAX_SEMANTICS.md §1–2).
    fn reference<E: Element>(args: &FlashArgs<'_, E>) -> Vec<f64> {
        let d = args.dims;
        let mut out = vec![0.0; d.batch * d.q_len * d.heads * d.v_depth];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.q_len {
                    let mut logits = vec![0.0; d.kv_len];
                    for (j, logit) in logits.iter_mut().enumerate() {
                        let q = ((b * d.q_len + i) * d.heads + h) * d.qk_depth;
                        let k = ((b * d.kv_len + j) * d.kv_heads + d.kv_head(h)) * d.qk_depth;
                        let mut x: f64 = (0..d.qk_depth)
                            .map(|t| {
                                args.query[q + t].to_f64()
                                    * args.query_scale
                                    * args.key[k + t].to_f64()
                            })
                            .sum();
                        if let Some(bias) = &args.bias {
                            let mut value = [x];
                            bias.add_f64((b, h, i), j, 1, &mut value, 1);
                            x = value[0];
                        }
                        let causal_keep =
                            args.mask.vis.is_trivial() || args.mask.vis.keeps(b, i, j);
                        let explicit_keep = args
                            .mask
                            .explicit
                            .as_ref()
                            .is_none_or(|m| m.row(b, h, i).get(j));
                        *logit = if causal_keep && explicit_keep {
                            x
                        } else {
                            args.big_neg
                        };
                    }
                    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    let mut keep = vec![1.0; d.kv_len];
                    if let Some(dropout) = &args.dropout {
                        let row = if dropout.broadcast {
                            i
                        } else {
                            (b * d.heads + h) * d.q_len + i
                        };
                        let mut rng = dropout.rng.clone();
                        rng.advance((row * d.kv_len) as u64);
                        for k in keep.iter_mut() {
                            let kept = u64::from(rng.next_u32()) < dropout.threshold;
                            *k = if kept { dropout.multiplier } else { 0.0 };
                        }
                    }
                    for j in 0..d.kv_len {
                        let w = weights[j] / sum * keep[j];
                        let v = ((b * d.kv_len + j) * d.kv_heads + d.kv_head(h)) * d.v_depth;
                        let o = ((b * d.q_len + i) * d.heads + h) * d.v_depth;
                        for t in 0..d.v_depth {
                            out[o + t] += w * args.value[v + t].to_f64();
                        }
                    }
                }
            }
        }
        out
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    fn data(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut rng = Pcg32::new(seed, 7);
        (0..n)
            .map(|_| (rng.next_u32() as f64 / 2f64.powi(32) * 2.0 - 1.0) * scale)
            .collect()
    }

    fn dims(batch: usize, q_len: usize, kv_len: usize, heads: usize, d: usize, dv: usize) -> Dims {
        Dims {
            batch,
            q_len,
            kv_len,
            heads,
            kv_heads: heads,
            qk_depth: d,
            v_depth: dv,
        }
    }

    /// A top-left causal mask for `d`.
    fn causal(d: &Dims) -> Visibility<'static> {
        Visibility::new(&super::super::Mask::causal(), d.batch, d.q_len, d.kv_len).unwrap()
    }

    /// `data` of `shape` broadcast to `[batch_shape..., heads, q_len, kv_len]`.
    fn resolved<'a, T: Copy>(
        data: &'a [T],
        shape: &[usize],
        batch_shape: &[usize],
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Option<Resolved<'a, T>> {
        let op = crate::kernel::Broadcast::new("operand", data, shape).ok()?;
        Resolved::new(&op, batch_shape, heads, q_len, kv_len).ok()
    }

    struct Inputs<E> {
        query: Vec<E>,
        key: Vec<E>,
        value: Vec<E>,
    }

    fn inputs<E: Element>(d: &Dims, seed: u64) -> Inputs<E> {
        let make = |n, s| data(n, s, 2.0).into_iter().map(E::from_f64).collect();
        Inputs {
            query: make(d.batch * d.q_len * d.heads * d.qk_depth, seed),
            key: make(d.batch * d.kv_len * d.kv_heads * d.qk_depth, seed + 1),
            value: make(d.batch * d.kv_len * d.kv_heads * d.v_depth, seed + 2),
        }
    }

    fn args<'a, E>(d: Dims, x: &'a Inputs<E>) -> FlashArgs<'a, E> {
        FlashArgs {
            dims: d,
            query: &x.query,
            key: &x.key,
            value: &x.value,
            query_scale: 1.0 / (d.qk_depth as f64).sqrt(),
            bias: None,
            mask: FlashMask::default(),
            big_neg: f32::MIN as f64,
            dropout: None,
            accumulate_f64: false,
            weights_bf16: false,
        }
    }

    /// Runs every available instruction set and checks `|got - want| <= atol + rtol·|want|`;
    /// with a mask tensor, both without and with its block summary (as calls build it), and
    /// checks that the two give the same bits.
    fn check<E: Element, O: Element>(args: &FlashArgs<'_, E>, atol: f64, rtol: f64) {
        let want = reference(args);
        let blocks = (args.mask.explicit.as_ref()).and_then(|mask| MaskBlocks::new(mask).unwrap());
        let summarized = blocks.map(|blocks| FlashArgs {
            mask: FlashMask {
                explicit_blocks: Some(blocks),
                ..args.mask.clone()
            },
            dropout: args.dropout.clone(),
            ..*args
        });
        for isa in Isa::available() {
            let mut got = vec![O::from_f64(0.0); want.len()];
            flash_attention(args, &mut got, None, isa, Threads(None)).unwrap();
            for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                let g = g.to_f64();
                assert!(
                    (g - w).abs() <= atol + rtol * w.abs(),
                    "{isa:?}: element {n}: got {g}, want {w}"
                );
            }
            if let Some(summarized) = &summarized {
                let mut again = vec![O::from_f64(0.0); want.len()];
                flash_attention(summarized, &mut again, None, isa, Threads(None)).unwrap();
                let bits = |v: &[O]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&again), "{isa:?}: with the mask summary");
            }
        }
    }

    #[test]
    fn mask_tensors_with_hidden_visible_and_mixed_blocks() {
        // Per batch element a different mask [2, 1, q, kv]: packed segments (block diagonal,
        // whole key blocks hidden, blocks entirely visible, edges mixed) and a causal mask
        // whose rows 0..40 are hidden entirely (uniform rows over skipped blocks).
        let (q, k) = (260, 300);
        let d = dims(2, q, k, 3, 16, 8);
        let x = inputs::<f32>(&d, 11);
        let segment = |n: usize| {
            [0..70, 70..200, 200..300]
                .iter()
                .position(|r| r.contains(&n))
        };
        let keep: Vec<bool> = (0..2 * q * k)
            .map(|n| {
                let (b, i, j) = (n / (q * k), n / k % q, n % k);
                if b == 0 {
                    segment(i) == segment(j)
                } else {
                    i >= 40 && j <= i
                }
            })
            .collect();
        let mut a = args::<f32>(d, &x);
        a.mask.explicit = resolved(&keep, &[2, 1, q, k], &[2], 3, q, k);
        check::<f32, f32>(&a, 1e-6, 1e-5);
        // With a causal structure on top (the summary and the structured range together).
        a.mask.vis = causal(&d);
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn unmasked_odd_sizes_cross_block_edges() {
        let d = dims(2, 37, 300, 3, 13, 20);
        let x = inputs::<f32>(&d, 1);
        check::<f32, f32>(&args::<f32>(d, &x), 1e-6, 1e-5);
    }

    #[test]
    fn causal_with_full_bias_matches() {
        let d = dims(1, 150, 150, 2, 64, 64);
        let x = inputs::<f32>(&d, 2);
        let bias_data: Vec<f32> = data(2 * 150 * 150, 9, 3.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut a = args::<f32>(d, &x);
        let bias = resolved(&bias_data, &[2, 150, 150], &[1], 2, 150, 150).unwrap();
        a.bias = Some(&bias);
        a.mask.vis = causal(&a.dims);
        assert!(a.bias.is_some());
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn causal_long_sequence_skips_blocks_and_matches() {
        let d = dims(1, 600, 600, 1, 16, 8);
        let x = inputs::<f32>(&d, 3);
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn fully_masked_rows_average_all_values_even_with_skipped_blocks() {
        // Causal + a query-padding mask that removes rows 3 and 500 entirely: Flax gives
        // those rows the mean of all value rows, including keys in skipped blocks.
        let (q, k) = (520, 700);
        let d = dims(1, q, k, 2, 8, 5);
        let x = inputs::<f32>(&d, 4);
        let keep: Vec<bool> = (0..q).map(|i| i != 3 && i != 500).collect();
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        a.mask.explicit = resolved(&keep, &[q, 1], &[1], 2, q, k);
        assert!(a.mask.explicit.is_some());
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn grouped_heads_with_every_structured_term() {
        use super::super::{Align, Mask, SegmentIds, Window};
        // 6 query heads reading 2 key/value heads; bottom-right causal, a window, lengths
        // (a padded query row and a batch element with 300 of 700 keys), segment ids.
        for (q, k) in [(150, 700), (1, 700), (37, 37)] {
            let mut d = dims(2, q, k, 6, 16, 8);
            d.kv_heads = 2;
            let x = inputs::<f32>(&d, 9);
            let ql = [q as i32, (q as i32 - 3).max(0)];
            let kl = [k as i32, (k as i32).min(300)];
            let qs: Vec<i32> = (0..2 * q)
                .map(|n| ((n % q) * 3 / q.max(1)) as i32)
                .collect();
            let ks: Vec<i32> = (0..2 * k).map(|n| ((n % k) * 3 / k) as i32).collect();
            let mask = Mask::none()
                .with_causal(Align::BottomRight)
                .with_window(Window {
                    left: 200,
                    right: 5,
                    align: Align::BottomRight,
                })
                .with_query_lengths(&ql)
                .with_kv_lengths(&kl)
                .with_segment_ids(SegmentIds {
                    query: &qs,
                    key: &ks,
                });
            let mut a = args::<f32>(d, &x);
            a.mask.vis = Visibility::new(&mask, 2, q, k).unwrap();
            check::<f32, f32>(&a, 1e-6, 1e-5);
            let mask = Mask::none()
                .with_window(Window {
                    left: 3,
                    right: 64,
                    align: Align::Offset(-50),
                })
                .with_kv_lengths(&kl);
            a.mask.vis = Visibility::new(&mask, 2, q, k).unwrap();
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }

    #[test]
    fn key_padding_skips_a_whole_block() {
        let (q, k) = (40, 800);
        let d = dims(2, q, k, 2, 16, 16);
        let x = inputs::<f32>(&d, 5);
        // Keys 256..512 (one whole block) and 700.. are padding in batch 0.
        let keep: Vec<bool> = (0..2 * k)
            .map(|n| n >= k || !((256..512).contains(&n) || n >= 700))
            .collect();
        let mut a = args::<f32>(d, &x);
        a.mask.explicit = resolved(&keep, &[2, 1, 1, k], &[2], 2, q, k);
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn no_keys_give_zeros() {
        let d = dims(2, 3, 0, 2, 4, 5);
        let x = inputs::<f32>(&d, 15);
        let mut out = vec![f32::NAN; 2 * 3 * 2 * 5];
        flash_attention(
            &args::<f32>(d, &x),
            &mut out,
            None,
            Isa::detect(),
            Threads(None),
        )
        .unwrap();
        assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
    }

    #[test]
    fn decode_single_query_row() {
        let d = dims(3, 1, 1000, 4, 128, 128);
        let x = inputs::<f32>(&d, 6);
        check::<f32, f32>(&args::<f32>(d, &x), 1e-6, 1e-5);
        // One batch element: its heads are split into groups of 2, 2 and 1 (3 tasks).
        let d = dims(1, 1, 300, 5, 16, 8);
        let x = inputs::<f32>(&d, 16);
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        check::<f32, f32>(&a, 1e-6, 1e-5);
        a.mask.vis = Visibility::default();
        check::<f32, f32>(&a, 1e-6, 1e-5);
    }

    #[test]
    fn single_rows_with_bias_masks_and_dropout() {
        // q_len 1 takes the memory-streaming path; short and long kv, per-head bias and mask,
        // a head whose mask is all false (uniform weights), dropout.
        for kv in [5, 300, 700] {
            let d = dims(3, 1, kv, 4, 16, 8);
            let x = inputs::<f32>(&d, 13);
            let bias_data: Vec<f32> = data(4 * kv, 14, 2.0).iter().map(|&v| v as f32).collect();
            let keep: Vec<bool> = (0..3 * 4 * kv)
                .map(|n| n / kv % 4 != 2 && (n % 7 != 3 || (n / kv) % 4 == 1))
                .map(|k| k || kv == 5)
                .collect();
            let bias = resolved(&bias_data, &[4, 1, kv], &[3], 4, 1, kv).unwrap();
            let mask = resolved(&keep, &[3, 4, 1, kv], &[3], 4, 1, kv).unwrap();
            let mut a = args::<f32>(d, &x);
            a.bias = Some(&bias);
            a.mask.explicit = Some(mask);
            if kv == 5 {
                a.mask.vis = causal(&a.dims);
            }
            a.dropout = Some(FlashDropout {
                rng: Pcg32::new(7, 0),
                threshold: (0.6 * 2f64.powi(32)) as u64,
                multiplier: (1.0f32 / 0.6) as f64,
                broadcast: false,
            });
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }

    #[test]
    fn bf16_inputs_with_f32_bias_and_f32_output() {
        let d = dims(2, 33, 70, 3, 16, 16);
        let x = inputs::<bf16>(&d, 7);
        let bias: Vec<f32> = data(70, 11, 1.0).iter().map(|&v| v as f32).collect();
        let mut a = args::<bf16>(d, &x);
        let bias = resolved(&bias, &[70], &[2], 3, 33, 70).unwrap();
        a.bias = Some(&bias);
        a.big_neg = bf16::MIN.to_f64();
        check::<bf16, f32>(&a, 1e-6, 1e-5);
        // bf16 output: one rounding to bf16 (relative error 2^-9).
        check::<bf16, bf16>(&a, 1e-6, 4e-3);
    }

    #[test]
    fn bf16_weights_rounded_before_the_value_product() {
        // Flax rounds bf16 weights before `P·V`; the bf16-pair products do too (the other
        // instruction sets keep them in f32). Each weight then carries a relative error of at
        // most 2^-9, so an output moves by at most 2^-9 · max|v| = 2^-9 · 2 (values in
        // [-2, 2)), plus 2^-9 relative for a bf16 output.
        // The second shape has an odd depth (a pair padded with zero), an odd number of keys
        // and a value depth that ends in a partial vector. Depths 64 and 1 have exact scales
        // (1/8, 1), so the scaled queries need no rounding.
        for d in [dims(2, 45, 300, 3, 64, 32), dims(1, 40, 77, 2, 1, 20)] {
            let x = inputs::<bf16>(&d, 9);
            let mut a = args::<bf16>(d, &x);
            a.weights_bf16 = true;
            a.big_neg = bf16::MIN.to_f64();
            let weights_bound = 2.0 * 2f64.powi(-9);
            check::<bf16, f32>(&a, weights_bound, 1e-5);
            check::<bf16, bf16>(&a, weights_bound, 2f64.powi(-9));
        }
    }

    #[test]
    fn f16_and_f64_inputs() {
        let d = dims(1, 17, 33, 2, 8, 4);
        let x = inputs::<f16>(&d, 8);
        check::<f16, f32>(&args::<f16>(d, &x), 1e-6, 1e-5);
        let x = inputs::<f64>(&d, 8);
        let mut a = args::<f64>(d, &x);
        a.mask.vis = causal(&a.dims);
        a.big_neg = f64::MIN;
        a.accumulate_f64 = true;
        check::<f64, f64>(&a, 1e-14, 1e-12);
    }

    #[test]
    fn dropout_uses_the_indexed_draws() {
        let d = dims(2, 70, 300, 2, 8, 8);
        let x = inputs::<f32>(&d, 9);
        for broadcast in [true, false] {
            let mut a = args::<f32>(d, &x);
            a.mask.vis = causal(&a.dims);
            a.dropout = Some(FlashDropout {
                rng: Pcg32::new(42, 0),
                threshold: (0.75 * 2f64.powi(32)) as u64,
                multiplier: (1.0f32 / 0.75) as f64,
                broadcast,
            });
            check::<f32, f32>(&a, 1e-6, 1e-5);
        }
    }

    #[test]
    fn rows_with_only_infinite_logits_are_nan_like_flax() {
        let d = dims(1, 2, 20, 1, 4, 3);
        let x = inputs::<f32>(&d, 10);
        // Row 0: every bias -inf -> NaN. Row 1: one finite entry -> that value row.
        let mut bias = vec![f32::NEG_INFINITY; 40];
        bias[20 + 7] = 0.0;
        let mut a = args::<f32>(d, &x);
        let bias = resolved(&bias, &[2, 20], &[1], 1, 2, 20).unwrap();
        a.bias = Some(&bias);
        let mut got = vec![0.0f32; 6];
        flash_attention(&a, &mut got, None, Isa::detect(), Threads(None)).unwrap();
        assert!(got[..3].iter().all(|x| x.is_nan()), "{got:?}");
        let v7 = &x.value[7 * 3..8 * 3];
        assert_eq!(&got[3..], v7);
    }

    #[test]
    fn bit_identical_for_any_thread_count() {
        let d = dims(2, 200, 333, 3, 64, 64);
        let x = inputs::<f32>(&d, 12);
        let mut a = args::<f32>(d, &x);
        a.mask.vis = causal(&a.dims);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // From outside the pool (a hand-over, or the caller alone for one thread) and from
            // inside it (a parallel iterator on its workers).
            let mut outside = vec![0.0f32; 2 * 200 * 3 * 64];
            flash_attention(&a, &mut outside, None, Isa::detect(), Threads(Some(&pool))).unwrap();
            let mut inside = vec![0.0f32; 2 * 200 * 3 * 64];
            pool.install(|| flash_attention(&a, &mut inside, None, Isa::detect(), Threads(None)))
                .unwrap();
            (outside, inside)
        };
        let (one, _) = run(1);
        for threads in [1, 2, 3, 5] {
            let (outside, inside) = run(threads);
            for (other, how) in [(outside, "from outside"), (inside, "from inside")] {
                assert!(
                    one.iter()
                        .zip(&other)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{threads} threads ({how} the pool) differ from 1"
                );
            }
        }
    }
}
