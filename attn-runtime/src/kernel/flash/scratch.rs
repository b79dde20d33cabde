//! The per-thread buffers of the output path ([`Scratch`]: transposed queries, running state,
//! one block of logits, widened keys and values, `bf16` pairs), sized per call by
//! [`Scratch::prepare`] with fallible allocations, and kept between calls in one cell per
//! thread and arithmetic ([`ThreadScratch`], [`with_thread_scratch`]). It imports only the
//! sizes (`dims.rs`) and the shared arithmetic of the `isa` module.

use std::ops::Range;

use super::super::isa::TileScalar;
use super::dims::{Dims, KEY_BLOCK};
use crate::error::{AttnError, num_elements};

/// Per-task buffers, reused across the tasks a rayon job runs. The task keeps the state of every
/// head and walks the key blocks in the outer loop: a block of keys of all heads is one
/// contiguous stretch of memory (`[kv, heads, depth]`), so each page of it is touched for all
/// heads at once instead of once per head.
pub(crate) struct Scratch<C> {
    /// Per head: scaled queries, transposed, `[qk_depth][width]`.
    pub(super) query_t: Vec<C>,
    /// Per head: output accumulator `[rows][v_depth]`.
    pub(super) acc: Vec<C>,
    /// Per head: running maximum and running sum per query column `[width]`.
    pub(super) max: Vec<C>,
    pub(super) sum: Vec<C>,
    /// Per head: ranges of keys skipped because a mask removes them entirely.
    pub(super) skipped: Vec<Vec<Range<usize>>>,
    /// Logits, then probabilities, of one block, transposed: `[KEY_BLOCK][width]`.
    pub(super) scores: Vec<C>,
    /// Rescale factor, exponent shift and block maximum of one block `[width]`.
    pub(super) alpha: Vec<C>,
    pub(super) shift: Vec<C>,
    pub(super) block_max: Vec<C>,
    /// Keys and values of one block widened to `C` when they are stored in another type.
    pub(super) keys: Vec<C>,
    pub(super) values: Vec<C>,
    /// Explicit mask of one block: `[KEY_BLOCK][rows]`, or `[heads][KEY_BLOCK]` for one row.
    pub(super) keep: Vec<bool>,
    /// For one row: the heads whose block is not entirely masked.
    pub(super) active: Vec<bool>,
    /// Operands of the `bf16` products
    /// ([`Isa::Avx512Bf16`](super::super::isa::Isa::Avx512Bf16) with `bf16` inputs).
    pub(super) pairs: Bf16Pairs,
}

/// `bf16` operands packed in pairs along the summation (see `isa::product_bf16_pairs`).
pub(super) struct Bf16Pairs {
    /// Per head: scaled queries rounded to `bf16`, `[qk_depth / 2][width]`.
    pub(super) query: Vec<u32>,
    /// Up to [`TRANSPOSE_TILE`](super::super::transpose::TRANSPOSE_TILE) query rows of the task
    /// as pairs, `[row][heads][qk_depth / 2]`, on their way into `query`.
    pub(super) query_rows: Vec<u32>,
    /// Keys of one block and head, `[cols][qk_depth / 2]`.
    pub(super) key: Vec<u32>,
    /// Values of one block and head, `[cols / 2][v_depth]`.
    pub(super) value: Vec<u32>,
    /// Probabilities of one block rounded to `bf16`, `[cols / 2][width]`.
    pub(super) probs: Vec<u32>,
}

impl<C: TileScalar> Scratch<C> {
    /// Empty buffers (sized by [`Scratch::prepare`]).
    pub(super) const fn empty() -> Self {
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
    pub(super) fn prepare(&mut self, d: &Dims, block: usize) -> Result<(), AttnError> {
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
pub(super) fn grow<T: Clone>(v: &mut Vec<T>, len: usize, value: T) -> Result<(), AttnError> {
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
pub(super) fn with_thread_scratch<C: ThreadScratch, R>(
    f: impl FnOnce(&mut Scratch<C>, &mut Vec<C>) -> R,
) -> R {
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
pub(super) type ScratchCell<C> = std::cell::RefCell<(Scratch<C>, Vec<C>)>;

/// An arithmetic with a scratch cell per thread (one `thread_local!` per type).
pub(super) trait ThreadScratch: TileScalar + 'static {
    /// Calls `f` with this thread's scratch cell for this arithmetic.
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R;
}

impl ThreadScratch for f32 {
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R {
        thread_local! {
            static SCRATCH: ScratchCell<f32> = const {
                std::cell::RefCell::new((Scratch::empty(), Vec::new()))
            };
        }
        SCRATCH.with(f)
    }
}

impl ThreadScratch for f64 {
    fn with_thread_scratch<R>(f: impl FnOnce(&ScratchCell<Self>) -> R) -> R {
        thread_local! {
            static SCRATCH: ScratchCell<f64> = const {
                std::cell::RefCell::new((Scratch::empty(), Vec::new()))
            };
        }
        SCRATCH.with(f)
    }
}
