//! The output path: tiled online-softmax attention in the manner of FlashAttention.
//!
//! When neither the weights are requested nor sown, the `q_len × kv_len` matrix is never built.
//! Each task takes one block of up to [`QUERY_BLOCK`](dims::QUERY_BLOCK) query rows of one batch
//! element, keeps the running state of every head, and walks the keys in blocks of
//! [`KEY_BLOCK`] (the keys of all heads of a block are one contiguous stretch of memory). Per
//! head and key block:
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
//! [`Visibility`](super::visibility::Visibility) leave to its rows: above a causal diagonal,
//! outside a window, past a kv length, every key for padded query rows; or a block on which an
//! explicit mask is false, found from the mask's block summary
//! [`MaskBlocks`](mask_blocks::MaskBlocks) built once per call, which also spares reading the
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
//!
//! ## Files
//!
//! One concept per file; the imports between them form a DAG, from the driver down to the
//! sizes (no file imports this one, except the tests' shared `testing.rs`):
//!
//! | file | holds | imports (within `flash/`) |
//! |---|---|---|
//! | `mod.rs` | the entry [`flash_attention`]: tasks, threads, and each task's walk over the key blocks (`TaskBody`) | `args`, `block`, `decode`, `dims`, `pack`, `scratch`, `softmax`, `tile` |
//! | `block.rs` | one key block × the task's query rows of one head on the tile products (`key_block`) | `args`, `dims`, `mask_blocks`, `pack`, `scratch`, `softmax`, `tile` |
//! | `decode.rs` | the same for a single query row, read in memory order (`single_row_block`) | `args`, `dims`, `pack`, `scratch`, `softmax`, `tile` |
//! | `softmax.rs` | the online softmax of one head: running state, one block, fully masked rows | `args`, `dims`, `mask`, `scratch`, `tile` |
//! | `pack.rs` | operand layouts: transposed or `bf16`-paired queries, widened rows | `args`, `dims`, `scratch`, `tile` |
//! | `tile.rs` | `TileReal`: the arithmetic (`f32`/`f64`) and its dispatch to the `isa` backends | `mask`, `scratch` |
//! | `args.rs` | [`FlashArgs`]: what a call reads | `dims`, `mask`, `mask_blocks` |
//! | `scratch.rs` | the per-thread buffers and their cells | `dims` |
//! | `mask.rs` | bias rows, mask, dropout; structured masking of a block | `dims`, `mask_blocks` |
//! | `mask_blocks.rs` | the block summary of an explicit mask tensor | `dims` |
//! | `dims.rs` | sizes of a call, of its blocks and of a task | — |
//! | `testing.rs` | (tests only) the float64 reference and helpers of every file's tests | |
//!
//! Outside `flash/`, these files import the instruction sets only through `kernel::isa` (never a
//! backend), and `dot.rs`, `transpose.rs`, `exp.rs`, `round.rs`, `broadcast.rs`,
//! `visibility.rs`, none of which imports the output path, and `call.rs`: the validated `Call`
//! that [`FlashArgs::of_call`] reads (as every driver of the kernels does). `call.rs` imports
//! no driver; `kernel/dispatch.rs` calls [`flash_attention`], so there is no edge back up.

mod args;
mod block;
mod decode;
mod dims;
mod mask;
mod mask_blocks;
mod pack;
mod scratch;
mod softmax;
#[cfg(test)]
mod testing;
mod tile;

use super::exp::MulAdd;
use super::isa::{Body, Isa};
use crate::context::Threads;
use crate::element::Element;
use crate::error::AttnError;
use block::key_block;
use decode::single_row_block;
use dims::{KEY_BLOCK, MIN_TASKS, Rows, query_block};
use pack::{pack_queries, pack_query_pairs};
use scratch::{Scratch, grow, with_thread_scratch};
use softmax::{add_back_skipped_keys, start_head};
use tile::TileReal;

pub(crate) use args::FlashArgs;

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

/// The task body, compiled per instruction set by
/// [`with_features`](super::isa::with_features).
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

#[cfg(test)]
mod tests {
    use super::testing::*;

    #[test]
    fn unmasked_odd_sizes_cross_block_edges() {
        let d = dims(2, 37, 300, 3, 13, 20);
        let x = inputs::<f32>(&d, 1);
        check::<f32, f32>(&args::<f32>(d, &x), 1e-6, 1e-5);
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
