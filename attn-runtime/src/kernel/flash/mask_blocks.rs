//! A summary of an explicit bool mask by blocks of keys, built once per output-path call.
//!
//! A mask tensor (Flax users write `mask=make_causal_mask(x)`, or pass a padding or packing
//! mask) is usually broadcast over the batch or the heads and is constant over large blocks.
//! Reading it for every head of every block cost as much as the block's arithmetic: a causal
//! mask handed over as a tensor ran at half the speed of a declared causal mask. With the
//! summary, the output path skips a key block that the mask hides from every row of a task,
//! reads no mask inside a block that it leaves entirely visible, and reads the mask only for
//! the blocks on its edges ([`BlockClass::Mixed`]).

use std::ops::Range;

use super::super::broadcast::Resolved;
use crate::error::AttnError;

/// Keys per summarized chunk; chunks start at key 0. Equal to the output path's key block, so
/// that a key block aligned to it spans one chunk.
pub(crate) const CHUNK: usize = super::dims::KEY_BLOCK;

/// What the mask does on a block of rows and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockClass {
    /// Every key of every row is masked: the block can be skipped.
    Hidden,
    /// No key of any row is masked: nothing to read or apply.
    Visible,
    /// Some keys are masked and some are not: read the mask.
    Mixed,
}

/// Bit of a chunk's class: some key of the chunk is visible.
const SOME_VISIBLE: u8 = 1;
/// Bit of a chunk's class: some key of the chunk is masked.
const SOME_MASKED: u8 = 2;

/// Per row of the mask operand's own data and per chunk of [`CHUNK`] keys: whether some key is
/// visible and whether some key is masked.
#[derive(Clone, Debug)]
pub(crate) struct MaskBlocks {
    /// Chunks per row.
    chunks: usize,
    /// `[own rows][chunks]`: [`SOME_VISIBLE`] | [`SOME_MASKED`] bits.
    class: Vec<u8>,
    /// Whether some chunk of some row is entirely masked.
    hides_chunks: bool,
}

impl MaskBlocks {
    /// The summary of `mask`, or `None` when the mask broadcasts its kv axis (one value per
    /// row: reading it is as cheap as the summary). One pass over the operand's own elements
    /// (not the broadcast ones); the summary holds one byte per [`CHUNK`] mask elements.
    pub(crate) fn new(mask: &Resolved<'_, bool>) -> Result<Option<Self>, AttnError> {
        let Some(rows) = mask.own_rows() else {
            return Ok(None);
        };
        let chunks = rows
            .clone()
            .next()
            .map_or(0, |row| row.len().div_ceil(CHUNK));
        let elements = rows.len().saturating_mul(chunks);
        let mut class = Vec::new();
        class
            .try_reserve_exact(elements)
            .map_err(|_| AttnError::Allocation {
                tensor: "mask summary",
                elements,
            })?;
        for row in rows {
            class.extend(row.chunks(CHUNK).map(|keys| {
                let visible = if keys.contains(&true) {
                    SOME_VISIBLE
                } else {
                    0
                };
                let masked = if keys.contains(&false) {
                    SOME_MASKED
                } else {
                    0
                };
                visible | masked
            }));
        }
        let hides_chunks = class.contains(&SOME_MASKED);
        Ok(Some(MaskBlocks {
            chunks,
            class,
            hides_chunks,
        }))
    }

    /// Whether the mask hides some whole chunk of keys from some row (as a causal or banded
    /// mask does): smaller query blocks then skip more.
    pub(crate) fn hides_chunks(&self) -> bool {
        self.hides_chunks
    }

    /// What `mask` (the operand this summary was built from) does on rows `rows` of batch
    /// element `b`, head `h`, and keys `keys` (non-empty, within the kv length).
    pub(crate) fn classify(
        &self,
        mask: &Resolved<'_, bool>,
        (b, h, rows): (usize, usize, Range<usize>),
        keys: Range<usize>,
    ) -> BlockClass {
        let chunks = keys.start / CHUNK..(keys.end - 1) / CHUNK + 1;
        let mut bits = 0;
        for i in rows {
            let row = mask.own_row_index(b, h, i) * self.chunks;
            for &c in &self.class[row + chunks.start..row + chunks.end] {
                bits |= c;
            }
            if bits == SOME_VISIBLE | SOME_MASKED {
                return BlockClass::Mixed;
            }
        }
        // A chunk wider than `keys` can only make a Visible or Hidden block look Mixed.
        match bits {
            SOME_VISIBLE => BlockClass::Visible,
            SOME_MASKED => BlockClass::Hidden,
            _ => BlockClass::Mixed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::broadcast::Broadcast;

    #[test]
    fn classifies_causal_blocks_and_broadcast_heads() {
        // A causal mask [1, 1, q, kv] broadcast to 2 batch elements and 3 heads.
        let (q, kv) = (300, 300);
        let keep: Vec<bool> = (0..q * kv).map(|n| n % kv <= n / kv).collect();
        let op = Broadcast::new("mask", &keep, &[1, 1, q, kv]).unwrap();
        let mask = Resolved::new(&op, &[2], 3, q, kv).unwrap();
        let blocks = MaskBlocks::new(&mask).unwrap().unwrap();
        assert_eq!(blocks.class.len(), q * kv.div_ceil(CHUNK));
        assert!(blocks.hides_chunks());
        for (b, h) in [(0, 0), (1, 2)] {
            // Rows 128..192 see keys 0..=i: keys 0..128 all visible, 128..256 mixed,
            // 256..300 hidden.
            assert_eq!(
                blocks.classify(&mask, (b, h, 128..192), 0..128),
                BlockClass::Visible
            );
            assert_eq!(
                blocks.classify(&mask, (b, h, 128..192), 128..256),
                BlockClass::Mixed
            );
            assert_eq!(
                blocks.classify(&mask, (b, h, 128..192), 256..300),
                BlockClass::Hidden
            );
            // Keys within a chunk: classified by the whole chunk (conservative).
            assert_eq!(
                blocks.classify(&mask, (b, h, 0..1), 1..5),
                BlockClass::Mixed
            );
        }
    }

    #[test]
    fn per_head_rows_and_splat_masks() {
        // A mask [2 heads, 1, kv]: head 0 sees nothing, head 1 everything.
        let kv = 200;
        let keep: Vec<bool> = (0..2 * kv).map(|n| n >= kv).collect();
        let op = Broadcast::new("mask", &keep, &[2, 1, kv]).unwrap();
        let mask = Resolved::new(&op, &[], 2, 7, kv).unwrap();
        let blocks = MaskBlocks::new(&mask).unwrap().unwrap();
        assert_eq!(
            blocks.classify(&mask, (0, 0, 0..7), 0..200),
            BlockClass::Hidden
        );
        assert_eq!(
            blocks.classify(&mask, (0, 1, 0..7), 0..200),
            BlockClass::Visible
        );
        assert!(blocks.hides_chunks());
        let all: Vec<bool> = vec![true; kv];
        let op = Broadcast::new("mask", &all, &[kv]).unwrap();
        let mask = Resolved::new(&op, &[], 2, 7, kv).unwrap();
        assert!(!MaskBlocks::new(&mask).unwrap().unwrap().hides_chunks());
        // A mask without the kv axis has no summary.
        let op = Broadcast::new("mask", &keep[..2], &[2, 1, 1]).unwrap();
        let mask = Resolved::new(&op, &[], 2, 7, kv).unwrap();
        assert!(MaskBlocks::new(&mask).unwrap().is_none());
    }
}
