//! The sizes the output path works with: of one call ([`Dims`]), of its blocks (the query
//! block of a task, [`query_block`], and the key block of the inner loop, [`KEY_BLOCK`]) and of
//! one task ([`Rows`]). Block boundaries depend on the shape only, never on the thread count:
//! that is what keeps the results bit-identical for any number of threads. This file imports
//! nothing from the rest of the kernels.

use std::ops::Range;

/// Query rows per task (fewer when that would leave fewer than [`MIN_TASKS`] tasks). Each task
/// reads the keys and values of its batch element once, so larger blocks read them less often.
pub(super) const QUERY_BLOCK: usize = 128;
/// Query rows per task under a causal mask: smaller blocks skip more of the keys above the
/// diagonal (at `B = 4, L = 512`, 128 rows were 14% slower than 64 with 2 threads).
pub(super) const CAUSAL_QUERY_BLOCK: usize = 64;
/// Keys per inner block.
pub(super) const KEY_BLOCK: usize = 128;
/// The query block shrinks (down to 16 rows) until there are at least this many tasks.
pub(super) const MIN_TASKS: usize = 4;

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

/// The query block for these sizes: depends on the shape only, never on the thread count.
pub(super) fn query_block(d: &Dims, causal: bool) -> usize {
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

/// Where one task works: batch element, first query row, rows, padded width (a multiple of
/// 16: the query columns of the transposed tiles; 1 for a single row), and its heads.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    /// Batch element.
    pub(super) b: usize,
    /// First query row.
    pub(super) first: usize,
    /// Query rows.
    pub(super) count: usize,
    /// Padded width: `count` rounded up to a multiple of 16, or 1 for a single row.
    pub(super) width: usize,
    /// First head.
    pub(super) first_head: usize,
    /// Heads.
    pub(super) heads: usize,
}

impl Rows {
    /// The heads of the task.
    pub(super) fn heads(&self) -> Range<usize> {
        self.first_head..self.first_head + self.heads
    }
}
