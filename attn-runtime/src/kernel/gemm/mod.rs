//! Products of strided matrix views: `matrixmultiply::{sgemm, dgemm}`, or for products with
//! very few rows or a very short inner dimension, [`thin`].
//!
//! The views ([`MatRef`], [`MatMut`], [`head_blocks_mut`]) are `mat.rs`'s, checked when they
//! are built: all of their elements lie inside the slices they borrow (see `mat.rs`). So the
//! `unsafe` calls below only ever touch memory a view borrows. The imports form a DAG: this
//! file → `thin.rs` → `mat.rs` (and this file → `mat.rs`); `mat.rs` imports nothing of the
//! kernels, `thin.rs` only `dot.rs`.

mod mat;
mod thin;

pub(crate) use mat::{MatMut, MatRef, head_blocks_mut};

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
}
