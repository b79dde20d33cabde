//! Strided matrix views over slices ([`MatRef`], [`MatMut`]) and the split of an output into
//! disjoint per-(batch, head) views ([`head_blocks_mut`]): the one concept the products of
//! `mod.rs` and `thin.rs` are written in.
//!
//! Every view is built here and checked when it is built: all of its elements lie inside the
//! slice it borrows (the largest offset is `offset + (rows-1)·rs + (cols-1)·cs`, strides are
//! non-negative and fit in `isize`), and a [`MatMut`]'s elements are distinct. The fields are
//! visible to `gemm/` for reading (the products pass them to `matrixmultiply`); no other file
//! builds a view, so the `unsafe` code of `mod.rs` and of this file only ever touches memory a
//! view borrows. It imports no other part of the kernels.

use core::marker::PhantomData;

/// The largest element offset of a strided `rows×cols` matrix starting at `offset`, if the
/// matrix is non-empty and the offset computation does not overflow.
fn last_offset(offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(offset);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(offset)
}

/// Checks that a strided matrix lies within a slice of `len` elements and that its strides
/// fit in `isize`.
fn fits(len: usize, offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    let empty = rows == 0 || cols == 0;
    isize::try_from(rs).is_ok()
        && isize::try_from(cs).is_ok()
        && match last_offset(offset, rows, cols, rs, cs) {
            Some(last) if empty => last <= len,
            Some(last) => last < len,
            None => false,
        }
}

/// A read-only strided matrix inside a slice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, T> {
    pub(super) data: &'a [T],
    pub(super) offset: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Element `(i, j)` is `data[offset + i·rs + j·cs]`; `None` if some element lies outside
    /// `data`.
    pub(crate) fn new(
        data: &'a [T],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Option<Self> {
        fits(data.len(), offset, rows, cols, rs, cs).then_some(MatRef {
            data,
            offset,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A contiguous row-major `rows×cols` matrix at the start of `data`.
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Option<Self> {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// Element `(i, j)`. Panics if it is outside the matrix.
    pub(super) fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        assert!(i < self.rows && j < self.cols, "MatRef::at out of range");
        self.data[self.offset + i * self.rs + j * self.cs]
    }

    /// Row `i` as a slice. Panics unless rows are contiguous (`cs = 1`) and `i < rows`.
    pub(super) fn row(&self, i: usize) -> &'a [T] {
        assert!(
            self.cs == 1 && i < self.rows,
            "MatRef::row of a strided row"
        );
        &self.data[self.offset + i * self.rs..][..self.cols]
    }

    /// Column `j` as a slice. Panics unless columns are contiguous (`rs = 1`) and `j < cols`.
    pub(super) fn col(&self, j: usize) -> &'a [T] {
        assert!(
            self.rs == 1 && j < self.cols,
            "MatRef::col of a strided column"
        );
        &self.data[self.offset + j * self.cs..][..self.rows]
    }
}

/// A mutable strided matrix: a unique borrow of the elements it describes (which need not be
/// contiguous, so several `MatMut`s can borrow interleaved parts of one slice).
#[derive(Debug)]
pub(crate) struct MatMut<'a, T> {
    pub(super) ptr: *mut T,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
    pub(super) _borrow: PhantomData<&'a mut T>,
}

// SAFETY: a `MatMut` is a unique borrow of its elements (no other `MatMut` or reference reaches
// them while it lives), so moving it to another thread is like moving a `&mut [T]`.
unsafe impl<T: Send> Send for MatMut<'_, T> {}

impl<'a, T> MatMut<'a, T> {
    /// Element `(i, j)` is `data[offset + i·rs + j·cs]`; `None` if some element lies outside
    /// `data`, or if two elements would share a place (`rs`, `cs` must separate them: the
    /// callers use `cs = 1` and `rs >= cols`).
    pub(crate) fn new(
        data: &'a mut [T],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Option<Self> {
        let distinct = (cs == 1 && (rows <= 1 || rs >= cols)) || rows == 0 || cols == 0;
        if !distinct || !fits(data.len(), offset, rows, cols, rs, cs) {
            return None;
        }
        Some(MatMut {
            // SAFETY: `offset <= data.len()` (checked by `fits`), so the pointer stays within
            // (or one past the end of) the slice.
            ptr: unsafe { data.as_mut_ptr().add(offset) },
            rows,
            cols,
            rs,
            cs,
            _borrow: PhantomData,
        })
    }

    /// A contiguous row-major `rows×cols` matrix at the start of `data`.
    pub(crate) fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Option<Self> {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// The number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// The number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `first..first + count` as a matrix of their own (a reborrow). Panics if they are
    /// not all rows of `self`.
    pub(crate) fn sub_rows(&mut self, first: usize, count: usize) -> MatMut<'_, T> {
        assert!(
            first.checked_add(count).is_some_and(|end| end <= self.rows),
            "MatMut::sub_rows out of range"
        );
        MatMut {
            // SAFETY: `first <= rows`; for `first < rows` the offset is that of an element of
            // the view (inside the borrowed slice); for `first == rows` (then `count == 0`)
            // the pointer is never dereferenced, and `wrapping_add` keeps it valid to hold.
            ptr: self.ptr.wrapping_add(first * self.rs),
            rows: count,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
            _borrow: PhantomData,
        }
    }

    /// Row `i` as a slice. Panics unless rows are contiguous (`cs = 1`) and `i < rows`.
    pub(super) fn row_mut(&mut self, i: usize) -> &mut [T] {
        assert!(
            self.cs == 1 && i < self.rows,
            "MatMut::row_mut of a strided row"
        );
        // SAFETY: with `cs = 1` the row's `cols` elements are consecutive; `i < rows`, and the
        // constructor checked that every element of the view lies inside the borrowed slice
        // (so the range is in bounds and initialized) and that rows do not overlap (`rs >=
        // cols`). `&mut self` keeps every other access to the view out while the slice lives.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols) }
    }

    /// Adds `values` to row `i` (`values.len()` must equal `cols`, `i < rows`).
    pub(crate) fn add_to_row(&mut self, i: usize, values: &[T])
    where
        T: Copy + core::ops::Add<Output = T>,
    {
        assert!(
            i < self.rows && values.len() == self.cols,
            "MatMut::add_to_row out of range"
        );
        for (j, &v) in values.iter().enumerate() {
            // SAFETY: `i < rows` and `j < cols` (asserted above), and the constructor checked
            // that every such element lies inside the borrowed slice and is initialized.
            unsafe {
                let p = self.ptr.add(i * self.rs + j * self.cs);
                p.write(*p + v);
            }
        }
    }

    /// Writes row `i` from `values` (`values.len()` must equal `cols`, `i < rows`).
    pub(crate) fn write_row(&mut self, i: usize, values: impl ExactSizeIterator<Item = T>) {
        assert!(
            i < self.rows && values.len() == self.cols,
            "MatMut::write_row out of range"
        );
        for (j, v) in values.enumerate() {
            // SAFETY: `i < rows` and `j < cols` (asserted above), and the constructor checked
            // that every such element lies inside the borrowed slice.
            unsafe { self.ptr.add(i * self.rs + j * self.cs).write(v) };
        }
    }
}

/// Splits `out`, laid out `[batch, rows, heads, cols]` row-major, into matrices of at most
/// `block_rows` consecutive rows of each `out[b, :, h, :]`, in the order (b, h, row block): block
/// `k` of (b, h) holds rows `k·block_rows ..`. `None` if `out` has the wrong length, `block_rows`
/// is 0 or an offset overflows.
pub(crate) fn head_blocks_mut<T>(
    out: &mut [T],
    batch: usize,
    rows: usize,
    heads: usize,
    cols: usize,
    block_rows: usize,
) -> Option<Vec<MatMut<'_, T>>> {
    let row_stride = heads.checked_mul(cols)?;
    let batch_stride = rows.checked_mul(row_stride)?;
    if batch.checked_mul(batch_stride)? != out.len() || block_rows == 0 {
        return None;
    }
    let mut blocks = Vec::new();
    let per_head = rows.div_ceil(block_rows);
    blocks
        .try_reserve_exact(batch.checked_mul(heads)?.checked_mul(per_head)?)
        .ok()?;
    let base = out.as_mut_ptr();
    for b in 0..batch {
        for h in 0..heads {
            for first in (0..rows).step_by(block_rows) {
                let offset = b * batch_stride + first * row_stride + h * cols;
                blocks.push(MatMut {
                    // SAFETY: `offset <= out.len()` because `b < batch`, `first < rows`,
                    // `h < heads` and `out.len() == batch·rows·heads·cols`; for an empty block
                    // the pointer is never dereferenced.
                    ptr: unsafe { base.add(offset.min(out.len())) },
                    rows: block_rows.min(rows - first),
                    cols,
                    rs: row_stride,
                    cs: 1,
                    _borrow: PhantomData,
                });
            }
        }
    }
    // SAFETY (of the borrows): element (i, j) of row block k of (b, h) is
    // `out[((b·rows + k·block_rows + i)·heads + h)·cols + j]` with `i < block_rows`,
    // `k·block_rows + i < rows`, `j < cols`, `h < heads`: a mixed-radix number, so distinct
    // (b, h, k, i, j) give distinct elements, all inside `out`. The blocks are disjoint unique
    // borrows of `out`, which stays mutably borrowed for `'_`.
    Some(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_bounds_checked() {
        let d = [0.0f32; 10];
        assert!(MatRef::new(&d, 0, 2, 5, 5, 1).is_some());
        assert!(MatRef::new(&d, 1, 2, 5, 5, 1).is_none());
        assert!(MatRef::new(&d, 10, 0, 5, 5, 1).is_some());
        assert!(MatRef::new(&d, 0, usize::MAX, 2, usize::MAX, 1).is_none());
        let mut m = [0.0f32; 10];
        assert!(
            MatMut::new(&mut m, 0, 2, 5, 4, 1).is_none(),
            "overlapping rows"
        );
    }

    #[test]
    fn head_blocks_are_disjoint_and_complete() {
        let (batch, rows, heads, cols) = (2, 5, 4, 2);
        for block_rows in [1, 2, 5, 7] {
            let mut out = vec![0u32; batch * rows * heads * cols];
            let mut blocks =
                head_blocks_mut(&mut out, batch, rows, heads, cols, block_rows).unwrap();
            assert_eq!(blocks.len(), batch * heads * rows.div_ceil(block_rows));
            for (n, blk) in blocks.iter_mut().enumerate() {
                let per_head = rows.div_ceil(block_rows);
                let (bh, first) = (n / per_head, (n % per_head) * block_rows);
                for i in 0..blk.rows() {
                    let row = first + i;
                    blk.write_row(i, (0..cols).map(|j| (bh * 100 + row * 10 + j) as u32 + 1));
                }
            }
            drop(blocks);
            for b in 0..batch {
                for i in 0..rows {
                    for h in 0..heads {
                        for j in 0..cols {
                            let got = out[((b * rows + i) * heads + h) * cols + j];
                            assert_eq!(got, ((b * heads + h) * 100 + i * 10 + j) as u32 + 1);
                        }
                    }
                }
            }
            assert!(head_blocks_mut(&mut out, batch, rows, heads, cols + 1, block_rows).is_none());
        }
        assert!(head_blocks_mut(&mut [0u32; 8], 1, 2, 2, 2, 0).is_none());
    }
}
