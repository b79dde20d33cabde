//! Strided matrix views over slices and their products: `matrixmultiply::{sgemm, dgemm}`, or
//! for products with very few rows or a very short inner dimension, [`thin`].
//!
//! Every view is checked when it is built: all of its elements lie inside the slice it borrows
//! (the largest offset is `offset + (rows-1)·rs + (cols-1)·cs`, strides are non-negative). So
//! the `unsafe` calls below only ever touch memory the view borrows.

use core::marker::PhantomData;

mod thin;

/// An element type `matrixmultiply` has a kernel for.
pub(crate) trait GemmScalar: super::dot::Dot + Send + Sync + 'static {
    /// `1`, the `beta` of [`gemm_add`].
    const UNIT: Self;

    /// `c ← alpha·a·b + beta·c`: see [`gemm`] and [`gemm_add`].
    ///
    /// # Safety
    /// `a`, `b` and `c` must be valid for the strided `m×k`, `k×n` and `m×n` matrices they
    /// describe (reads for `a`, `b`; writes for `c`, and reads of `c` unless `beta = 0`), and
    /// `c` must not alias `a` or `b` or itself.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl GemmScalar for f32 {
    const UNIT: f32 = 1.0;

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract. With `beta = 0` matrixmultiply
        // never reads `c`.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl GemmScalar for f64 {
    const UNIT: f64 = 1.0;

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract (see the f32 impl).
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

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
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
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
    fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        assert!(i < self.rows && j < self.cols, "MatRef::at out of range");
        self.data[self.offset + i * self.rs + j * self.cs]
    }

    /// Row `i` as a slice. Panics unless rows are contiguous (`cs = 1`) and `i < rows`.
    fn row(&self, i: usize) -> &'a [T] {
        assert!(
            self.cs == 1 && i < self.rows,
            "MatRef::row of a strided row"
        );
        &self.data[self.offset + i * self.rs..][..self.cols]
    }

    /// Column `j` as a slice. Panics unless columns are contiguous (`rs = 1`) and `j < cols`.
    fn col(&self, j: usize) -> &'a [T] {
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
    ptr: *mut T,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _borrow: PhantomData<&'a mut T>,
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
    fn row_mut(&mut self, i: usize) -> &mut [T] {
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

/// `c ← alpha·a·b` (`c` is overwritten, never read). Panics if the shapes disagree (an
/// internal invariant: callers build the views from validated geometry).
pub(crate) fn gemm<T: GemmScalar>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut MatMut<'_, T>,
) {
    gemm_beta(alpha, a, b, false, c)
}

/// `c ← c + alpha·a·b`. Panics if the shapes disagree.
pub(crate) fn gemm_add<T: GemmScalar>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: &mut MatMut<'_, T>,
) {
    gemm_beta(alpha, a, b, true, c)
}

/// `c ← alpha·a·b + beta·c` with `beta` 1 when `accumulate`, else 0 (`c` not read).
fn gemm_beta<T: GemmScalar>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
    c: &mut MatMut<'_, T>,
) {
    let beta = if accumulate { T::UNIT } else { T::default() };
    assert!(
        a.rows == c.rows && a.cols == b.rows && b.cols == c.cols,
        "gemm: shape mismatch ({}x{}) · ({}x{}) -> ({}x{})",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if thin::product(alpha, a, b, accumulate, c) {
        return;
    }
    // Strides fit in isize: checked by the constructors.
    let s = |x: usize| x as isize;
    // SAFETY: `a`, `b` and `c` were checked at construction to lie within their slices for
    // their full extents (rows×cols with strides rs, cs); `a.offset`/`b.offset` are within the
    // slices; `c` uniquely borrows its elements, so it aliases neither `a` nor `b` (shared
    // borrows) nor itself (distinct elements, checked by the constructors); `c`'s elements
    // are initialized (they come from a `&mut [T]`), so reading them for `beta != 0` is sound.
    unsafe {
        T::gemm_raw(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr().add(a.offset),
            s(a.rs),
            s(a.cs),
            b.data.as_ptr().add(b.offset),
            s(b.rs),
            s(b.cs),
            beta,
            c.ptr,
            s(c.rs),
            s(c.cs),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

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
    fn strided_heads_match_naive() {
        // q: [rows=3, heads=2, depth=4]; k: [kv=5, heads=2, depth=4].
        let (rows, heads, depth, kv) = (3, 2, 4, 5);
        let q: Vec<f64> = (0..rows * heads * depth)
            .map(|x| (x as f64 * 0.37).sin())
            .collect();
        let k: Vec<f64> = (0..kv * heads * depth)
            .map(|x| (x as f64 * 0.11).cos())
            .collect();
        for h in 0..heads {
            let a = MatRef::new(&q, h * depth, rows, depth, heads * depth, 1).unwrap();
            let b = MatRef::new(&k, h * depth, depth, kv, 1, heads * depth).unwrap();
            let mut out = vec![f64::NAN; rows * kv];
            gemm(
                1.0,
                a,
                b,
                &mut MatMut::row_major(&mut out, rows, kv).unwrap(),
            );
            let qa: Vec<f64> = (0..rows)
                .flat_map(|i| (0..depth).map(move |d| (i, d)))
                .map(|(i, d)| q[(i * heads + h) * depth + d])
                .collect();
            let kt: Vec<f64> = (0..depth)
                .flat_map(|d| (0..kv).map(move |j| (d, j)))
                .map(|(d, j)| k[(j * heads + h) * depth + d])
                .collect();
            let want = naive(&qa, &kt, rows, depth, kv);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() < 1e-12);
            }
        }
    }

    /// `0.5·a·b` (`+ c0` when `accumulate`) through [`gemm`] / [`gemm_add`] in `T`, with `b`
    /// row-major or as the transpose `bt` read with strides `(1, k)`.
    fn product<T: GemmScalar + From<f32> + Into<f64>>(
        (a, b, bt, c0): (&[f32], &[f32], &[f32], &[f32]),
        (m, k, n): (usize, usize, usize),
        transposed: bool,
        accumulate: bool,
    ) -> Vec<f64> {
        let t = |v: &[f32]| v.iter().map(|&x| T::from(x)).collect::<Vec<T>>();
        let (a, b, bt) = (t(a), t(b), t(bt));
        let mut out = if accumulate {
            t(c0)
        } else {
            vec![T::from(f32::NAN); m * n]
        };
        let am = MatRef::row_major(&a, m, k).unwrap();
        let bm = if transposed {
            MatRef::new(&bt, 0, k, n, 1, k).unwrap()
        } else {
            MatRef::row_major(&b, k, n).unwrap()
        };
        let c = &mut MatMut::row_major(&mut out, m, n).unwrap();
        let half = T::from(0.5);
        if accumulate {
            gemm_add(half, am, bm, c);
        } else {
            gemm(half, am, bm, c);
        }
        out.into_iter().map(Into::into).collect()
    }

    /// Every layout the row-by-row products take (and those they leave to matrixmultiply), in
    /// f32 and f64, overwriting and accumulating, against the naive product.
    #[test]
    fn thin_and_full_products_match_naive() {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 128, 33),
            (3, 17, 16),
            (4, 5, 7),
            (5, 2, 9),
            (6, 1, 40),
            (9, 13, 5),
        ] {
            let a: Vec<f32> = (0..m * k).map(|x| (x as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|x| (x as f32 * 0.11).cos()).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            let c0: Vec<f32> = (0..m * n).map(|x| (x as f32 * 0.7).sin()).collect();
            let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            let want = naive(&wide(&a), &wide(&b), m, k, n);
            for transposed in [false, true] {
                for accumulate in [false, true] {
                    let ops = (&a[..], &b[..], &bt[..], &c0[..]);
                    let got64 = product::<f64>(ops, (m, k, n), transposed, accumulate);
                    let got32 = product::<f32>(ops, (m, k, n), transposed, accumulate);
                    for (got, tol) in [(got64, 1e-12), (got32, 1e-4)] {
                        for (x, (y, &z)) in got.iter().zip(want.iter().zip(&c0)) {
                            let y = y * 0.5 + if accumulate { f64::from(z) } else { 0.0 };
                            assert!(
                                (x - y).abs() < tol,
                                "{m}x{k}x{n} transposed={transposed} accumulate={accumulate}"
                            );
                        }
                    }
                }
            }
        }
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
