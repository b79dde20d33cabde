//! Products with at most [`ROWS`] rows, or an inner dimension of at most [`DEPTH`]: a decoding
//! step's single query row and the rank-one updates of its backward step. `matrixmultiply`
//! packs both operands into panels and runs a kernel of many rows; for one row it copies a whole
//! operand (the keys, the values) to use one row of each kernel call. Here each row of the
//! result is built in place from contiguous rows or columns of the operands: a row of `B`
//! scaled and added (`axpy`), or a dot product with a column of `B`.
//!
//! The order of the operations depends only on the shapes, never on threads.

use super::super::dot::Dot;
use super::mat::{MatMut, MatRef};

/// Products with at most this many rows are computed row by row.
const ROWS: usize = 4;
/// Products with an inner dimension of at most this are computed row by row.
const DEPTH: usize = 2;

/// `c ← alpha·a·b` (or `c ← c + alpha·a·b` when `accumulate`) if the shapes and layouts suit a
/// row-by-row product (each row of `c` contiguous, and the rows or the columns of `b`);
/// `false` (and `c` untouched) if not. The shapes agree (checked by the
/// caller) and are not empty.
pub(super) fn product<T: Dot>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
    c: &mut MatMut<'_, T>,
) -> bool {
    let (m, depth, n) = (a.rows, a.cols, b.cols);
    if c.cs != 1 {
        return false;
    }
    if b.cs == 1 && (m <= ROWS || depth <= DEPTH) {
        // Row i of c: Σₖ (alpha·a[i,k]) · b[k,:], k in order.
        for i in 0..m {
            let row = c.row_mut(i);
            if !accumulate {
                row.fill(T::default());
            }
            for k in 0..depth {
                T::axpy(row, alpha * a.at(i, k), b.row(k));
            }
        }
        return true;
    }
    if b.rs == 1 && a.cs == 1 && m <= ROWS {
        // c[i,j] = alpha · (a[i,:] · b[:,j]), four columns at a time.
        for i in 0..m {
            let (ai, row) = (a.row(i), c.row_mut(i));
            let mut j = 0;
            while j < n {
                let cols = (n - j).min(4);
                let mut dots = [T::default(); 4];
                if cols == 4 {
                    dots = T::dot4([ai; 4], [0, 1, 2, 3].map(|t| b.col(j + t)));
                } else {
                    for (t, d) in dots.iter_mut().enumerate().take(cols) {
                        *d = T::dot(ai, b.col(j + t));
                    }
                }
                for (o, &d) in row[j..j + cols].iter_mut().zip(&dots) {
                    *o = if accumulate {
                        *o + alpha * d
                    } else {
                        alpha * d
                    };
                }
                j += cols;
            }
        }
        return true;
    }
    false
}
