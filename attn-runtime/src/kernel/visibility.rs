//! Which keys each query sees: the structured terms of a [`Mask`] (causal with an alignment, a
//! sliding window, query and key/value lengths, segment ids) and its dense bool tensor.
//!
//! None of the structured terms builds a `q × kv` mask: they are evaluated per `(i, j)` by
//! [`Visibility::keeps`], and as key ranges ([`Visibility::row_range`],
//! [`Visibility::block_range`]) that the drivers use to skip keys no query of a block sees.

use std::ops::Range;

use super::broadcast::Broadcast;
use crate::error::AttnError;

/// Where query row `i` sits among the keys, for causal masks and windows: position
/// `i + q_offset`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Align {
    /// `q_offset = 0` (Flax `make_causal_mask`, jax.nn `is_causal`).
    #[default]
    TopLeft,
    /// `q_offset = kv_len - q_len` (KV-cache decoding, chunked prefill).
    BottomRight,
    /// `q_offset` given.
    Offset(i64),
}

impl Align {
    /// The position of query 0 among the keys for `q_len` queries and `kv_len` keys.
    pub fn q_offset(self, q_len: usize, kv_len: usize) -> i64 {
        match self {
            Align::TopLeft => 0,
            Align::BottomRight => kv_len as i64 - q_len as i64,
            Align::Offset(o) => o,
        }
    }
}

/// Sliding window: key `j` visible to query `i` iff `pos(i) - left <= j <= pos(i) + right`,
/// with `pos(i) = i + align.q_offset(..)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Keys before the query's position that it sees.
    pub left: usize,
    /// Keys after the query's position that it sees.
    pub right: usize,
    /// Where the queries sit among the keys.
    pub align: Align,
}

/// Segment ids of packed sequences (row-major): query `[batch.., q_len]`, key `[batch..,
/// kv_len]`. Query `i` sees key `j` only when their ids are equal.
#[derive(Clone, Copy, Debug)]
pub struct SegmentIds<'a> {
    /// One id per (batch element, query).
    pub query: &'a [i32],
    /// One id per (batch element, key).
    pub key: &'a [i32],
}

/// The visibility of a call: the AND of every term present (no term: every key is visible).
/// Keys a query does not see get Flax's `big_neg` logit; a row that sees no key at all gets
/// uniform weights over all keys (as Flax gives).
#[derive(Clone, Debug, Default)]
pub struct Mask<'a> {
    /// Causal: query `i` sees keys `j <= i + q_offset`.
    pub causal: Option<Align>,
    /// A sliding window.
    pub window: Option<Window>,
    /// One per batch element (batch dims flattened row-major): query rows `i >= len` see no
    /// key.
    pub query_lengths: Option<&'a [i32]>,
    /// One per batch element: keys `j >= len` are invisible.
    pub kv_lengths: Option<&'a [i32]>,
    /// Segment ids of packed sequences.
    pub segment_ids: Option<SegmentIds<'a>>,
    /// A bool tensor broadcast to `[batch.., heads, q_len, kv_len]`: `false` hides the key.
    pub dense: Option<Broadcast<'a, bool>>,
}

impl<'a> Mask<'a> {
    /// No mask: every query sees every key.
    pub fn none() -> Self {
        Mask::default()
    }

    /// Causal, top-left aligned (Flax's `make_causal_mask`): query `i` sees keys `j <= i`.
    pub fn causal() -> Self {
        Mask::default().with_causal(Align::TopLeft)
    }

    /// Only a dense bool mask.
    pub fn dense(mask: Broadcast<'a, bool>) -> Self {
        Mask::default().with_dense(mask)
    }

    /// Adds a causal term with the given alignment.
    pub fn with_causal(mut self, align: Align) -> Self {
        self.causal = Some(align);
        self
    }

    /// Adds a sliding window.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Adds query lengths, one per batch element.
    pub fn with_query_lengths(mut self, lengths: &'a [i32]) -> Self {
        self.query_lengths = Some(lengths);
        self
    }

    /// Adds key/value lengths, one per batch element.
    pub fn with_kv_lengths(mut self, lengths: &'a [i32]) -> Self {
        self.kv_lengths = Some(lengths);
        self
    }

    /// Adds segment ids.
    pub fn with_segment_ids(mut self, ids: SegmentIds<'a>) -> Self {
        self.segment_ids = Some(ids);
        self
    }

    /// Adds a dense bool mask (ANDed with the other terms).
    pub fn with_dense(mut self, mask: Broadcast<'a, bool>) -> Self {
        self.dense = Some(mask);
        self
    }
}

/// The structured terms of a [`Mask`], validated against a call's sizes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Visibility<'a> {
    q_len: usize,
    kv_len: usize,
    /// Key `j` visible iff `j <= i + offset`.
    causal: Option<i64>,
    /// `(offset, left, right)`: key `j` visible iff `i + offset - left <= j <= i + offset +
    /// right`.
    window: Option<(i64, i64, i64)>,
    query_lengths: Option<&'a [i32]>,
    kv_lengths: Option<&'a [i32]>,
    segments: Option<SegmentIds<'a>>,
}

/// Checks one per-batch lengths array: `batch` values in `0..=len`.
fn check_lengths(
    argument: &'static str,
    lengths: &[i32],
    batch: usize,
    len: usize,
    what: &str,
) -> Result<(), AttnError> {
    if lengths.len() != batch {
        return Err(AttnError::InvalidArgument {
            argument,
            reason: format!(
                "expected one length per batch element ({batch}), found {} values",
                lengths.len()
            ),
        });
    }
    for (b, &n) in lengths.iter().enumerate() {
        if n < 0 || n as i64 > len as i64 {
            return Err(AttnError::InvalidArgument {
                argument,
                reason: format!(
                    "expected lengths in 0..={len} (the {what}), found {n} at batch element {b}"
                ),
            });
        }
    }
    Ok(())
}

impl<'a> Visibility<'a> {
    /// Every term as numbers, for a call's fingerprint: the causal and window offsets, and the
    /// lengths and segment ids (each list preceded by its length, absent terms as markers).
    pub(crate) fn words(&self) -> impl Iterator<Item = u64> + '_ {
        let opt = |x: Option<i64>| [u64::from(x.is_some()), x.unwrap_or(0) as u64];
        let (wo, wl, wr) = self.window.unwrap_or((0, 0, 0));
        let ints = |xs: Option<&'a [i32]>| {
            let xs = xs.unwrap_or(&[]);
            std::iter::once(xs.len() as u64).chain(xs.iter().map(|&x| x as u64))
        };
        opt(self.causal)
            .into_iter()
            .chain([
                u64::from(self.window.is_some()),
                wo as u64,
                wl as u64,
                wr as u64,
            ])
            .chain(ints(self.query_lengths))
            .chain(ints(self.kv_lengths))
            .chain(ints(self.segments.map(|s| s.query)))
            .chain(ints(self.segments.map(|s| s.key)))
    }

    /// Validates the structured terms of `mask` for `batch` batch elements (flattened).
    pub(crate) fn new(
        mask: &Mask<'a>,
        batch: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Result<Self, AttnError> {
        if let Some(l) = mask.query_lengths {
            check_lengths("query_lengths", l, batch, q_len, "query length")?;
        }
        if let Some(l) = mask.kv_lengths {
            check_lengths("kv_lengths", l, batch, kv_len, "key/value length")?;
        }
        if let Some(s) = &mask.segment_ids {
            for (argument, ids, len) in [
                ("query_segment_ids", s.query, q_len),
                ("kv_segment_ids", s.key, kv_len),
            ] {
                let expected = batch.saturating_mul(len);
                if ids.len() != expected {
                    return Err(AttnError::InvalidArgument {
                        argument,
                        reason: format!(
                            "expected {expected} ids ([batch.., {len}] with {batch} batch elements), found {}",
                            ids.len()
                        ),
                    });
                }
            }
        }
        let too_big = |argument: &'static str, v: usize| -> Result<i64, AttnError> {
            i64::try_from(v)
                .ok()
                .filter(|v| *v <= i64::MAX / 4)
                .ok_or_else(|| AttnError::InvalidArgument {
                    argument,
                    reason: format!("expected at most {}, found {v}", i64::MAX / 4),
                })
        };
        let clamp = |o: i64| o.clamp(i64::MIN / 4, i64::MAX / 4);
        let window = match mask.window {
            Some(w) => Some((
                clamp(w.align.q_offset(q_len, kv_len)),
                too_big("window.left", w.left)?,
                too_big("window.right", w.right)?,
            )),
            None => None,
        };
        Ok(Visibility {
            q_len,
            kv_len,
            causal: mask.causal.map(|a| clamp(a.q_offset(q_len, kv_len))),
            window,
            query_lengths: mask.query_lengths,
            kv_lengths: mask.kv_lengths,
            segments: mask.segment_ids,
        })
    }

    /// Whether no structured term is present.
    pub(crate) fn is_trivial(&self) -> bool {
        self.causal.is_none()
            && self.window.is_none()
            && self.query_lengths.is_none()
            && self.kv_lengths.is_none()
            && self.segments.is_none()
    }

    /// Whether the only term is a top-left causal mask (`j <= i`).
    pub(crate) fn is_causal_only(&self) -> bool {
        self.causal == Some(0)
            && self.window.is_none()
            && self.query_lengths.is_none()
            && self.kv_lengths.is_none()
            && self.segments.is_none()
    }

    /// The query lengths, if given.
    pub(crate) fn query_lengths_slice(&self) -> Option<&'a [i32]> {
        self.query_lengths
    }

    /// Whether the visible keys move with the query row (a causal term or a window).
    pub(crate) fn banded(&self) -> bool {
        self.causal.is_some() || self.window.is_some()
    }

    /// The keys row `(b, i)` may see: every key outside is invisible; inside, the segment ids
    /// decide (see [`Visibility::keeps`]). Empty when the row sees no key.
    #[inline]
    pub(crate) fn row_range(&self, b: usize, i: usize) -> Range<usize> {
        let kv = self.kv_len as i64;
        if let Some(l) = self.query_lengths
            && i as i64 >= i64::from(l[b])
        {
            return 0..0;
        }
        let mut lo = 0i64;
        let mut hi = kv;
        let i = i as i64;
        if let Some(off) = self.causal {
            hi = hi.min(i + off + 1);
        }
        if let Some((off, left, right)) = self.window {
            lo = lo.max(i + off - left);
            hi = hi.min(i + off + right + 1);
        }
        if let Some(l) = self.kv_lengths {
            hi = hi.min(i64::from(l[b]));
        }
        if hi <= lo {
            return 0..0;
        }
        lo as usize..hi as usize
    }

    /// The union of the row ranges of rows `rows` of batch element `b` (a range containing
    /// every key any of the rows may see; empty when none sees any).
    pub(crate) fn block_range(&self, b: usize, rows: Range<usize>) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let mut last = rows.end;
        if let Some(l) = self.query_lengths {
            last = last.min(l[b].max(0) as usize);
        }
        if last <= rows.start {
            return 0..0;
        }
        // Both bounds grow with `i`: the first row gives the start, the last the end.
        let first = self.row_range_unpadded(b, rows.start);
        let end = self.row_range_unpadded(b, last - 1);
        let (mut lo, mut hi) = (first.start, end.end);
        if let Some(span) = self.segment_span(b, rows.start..last) {
            lo = lo.max(span.start);
            hi = hi.min(span.end);
        }
        if hi <= lo { 0..0 } else { lo..hi }
    }

    /// Packed sequences: when the key segment ids of batch element `b` are sorted (each
    /// sequence one stretch of keys, as packing lays them out), the keys whose ids lie between
    /// the smallest and the largest id of query rows `rows`; every other key is in another
    /// segment than every row. `None` without segment ids or with unsorted key ids (then the
    /// ids are only compared element by element).
    fn segment_span(&self, b: usize, rows: Range<usize>) -> Option<Range<usize>> {
        let s = self.segments?;
        let queries = &s.query[b * self.q_len..][rows];
        let keys = &s.key[b * self.kv_len..(b + 1) * self.kv_len];
        let min = queries.iter().copied().min()?;
        let max = queries.iter().copied().max()?;
        if !keys.is_sorted() {
            return None;
        }
        Some(keys.partition_point(|&k| k < min)..keys.partition_point(|&k| k <= max))
    }

    /// [`Visibility::row_range`] without the query length, with possibly empty (start > end)
    /// bounds kept as they are (clamped to `0..=kv_len`).
    fn row_range_unpadded(&self, b: usize, i: usize) -> Range<usize> {
        let kv = self.kv_len as i64;
        let i = i as i64;
        let mut lo = 0i64;
        let mut hi = kv;
        if let Some(off) = self.causal {
            hi = hi.min(i + off + 1);
        }
        if let Some((off, left, right)) = self.window {
            lo = lo.max(i + off - left);
            hi = hi.min(i + off + right + 1);
        }
        if let Some(l) = self.kv_lengths {
            hi = hi.min(i64::from(l[b]));
        }
        lo.clamp(0, kv) as usize..hi.clamp(0, kv) as usize
    }

    /// The segment id of query `(b, i)` and the key ids of batch element `b`, if segment ids
    /// are given.
    #[inline]
    pub(crate) fn segments(&self, b: usize, i: usize) -> Option<(i32, &'a [i32])> {
        self.segments.map(|s| {
            (
                s.query[b * self.q_len + i],
                &s.key[b * self.kv_len..(b + 1) * self.kv_len],
            )
        })
    }

    /// Whether query `(b, i)` sees key `j` by the structured terms (the dense mask aside).
    #[cfg(test)]
    pub(crate) fn keeps(&self, b: usize, i: usize, j: usize) -> bool {
        self.row_range(b, i).contains(&j)
            && self.segments(b, i).is_none_or(|(id, keys)| keys[j] == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(v: &Visibility<'_>, batch: usize) -> Vec<bool> {
        let mut out = Vec::new();
        for b in 0..batch {
            for i in 0..v.q_len {
                for j in 0..v.kv_len {
                    out.push(v.keeps(b, i, j));
                }
            }
        }
        out
    }

    #[test]
    fn packed_segments_narrow_the_block_range() {
        // Sorted key ids (packed sequences of 3, 4 and 2 tokens) and unsorted ones.
        let sorted = [1, 1, 1, 2, 2, 2, 2, 5, 5];
        let unsorted = [1, 2, 1, 2, 2, 2, 2, 5, 5];
        for keys in [sorted, unsorted] {
            let queries = sorted;
            let mask = Mask::causal().with_segment_ids(SegmentIds {
                query: &queries,
                key: &keys,
            });
            let v = Visibility::new(&mask, 1, 9, 9).unwrap();
            for first in 0..9 {
                for last in first + 1..=9 {
                    let r = v.block_range(0, first..last);
                    for i in first..last {
                        for j in 0..9 {
                            if v.keeps(0, i, j) {
                                assert!(r.contains(&j), "{keys:?} rows {first}..{last} key {j}");
                            }
                        }
                    }
                }
            }
            // Rows 3..7 (segment 2): keys 3..=6 when sorted, causal only when not.
            let want = if keys == sorted { 3..7 } else { 0..7 };
            assert_eq!(v.block_range(0, 3..7), want);
        }
    }

    #[test]
    fn ranges_cover_the_visible_keys() {
        let ql = [3, 5];
        let kl = [6, 2];
        let qs = [0, 0, 1, 1, 1, 0, 0, 0, 1, 1];
        let ks = [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1];
        let mask = Mask::causal()
            .with_causal(Align::BottomRight)
            .with_window(Window {
                left: 2,
                right: 0,
                align: Align::BottomRight,
            })
            .with_query_lengths(&ql)
            .with_kv_lengths(&kl)
            .with_segment_ids(SegmentIds {
                query: &qs,
                key: &ks,
            });
        let v = Visibility::new(&mask, 2, 5, 6).unwrap();
        let d = dense(&v, 2);
        for b in 0..2 {
            for i in 0..5 {
                let pos = i as i64 + 1;
                for j in 0..6 {
                    let want = (i as i32) < ql[b]
                        && (j as i32) < kl[b]
                        && j as i64 <= pos
                        && j as i64 >= pos - 2
                        && qs[b * 5 + i] == ks[b * 6 + j];
                    assert_eq!(d[(b * 5 + i) * 6 + j], want, "b {b} i {i} j {j}");
                }
            }
            for first in 0..5 {
                for last in first..=5 {
                    let r = v.block_range(b, first..last);
                    for i in first..last {
                        for j in 0..6 {
                            if v.keeps(b, i, j) {
                                assert!(r.contains(&j));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_lengths_and_ids() {
        let l = [3, -1];
        let e = Visibility::new(&Mask::none().with_kv_lengths(&l), 2, 4, 4).unwrap_err();
        assert!(e.to_string().contains("kv_lengths"), "{e}");
        let l = [5, 1];
        let e = Visibility::new(&Mask::none().with_query_lengths(&l), 2, 4, 4).unwrap_err();
        assert!(e.to_string().contains("found 5"), "{e}");
        let ids = [0; 7];
        let m = Mask::none().with_segment_ids(SegmentIds {
            query: &ids,
            key: &ids[..4],
        });
        let e = Visibility::new(&m, 2, 4, 2).unwrap_err();
        assert!(e.to_string().contains("query_segment_ids"), "{e}");
    }
}
