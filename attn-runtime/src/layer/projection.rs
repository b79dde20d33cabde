//! The layer's dense projections (Flax's `DenseGeneral`) and the QK LayerNorm.
//!
//! A projection is one GEMM: the input viewed as a row-major `[M, E]` matrix (`M` = batch ×
//! length) times the kernel viewed as `[E, N]` (`N` = heads × head_dim, or the out features).
//! The `[M, N]` result is already the attention kernels' `[batch.., len, heads, depth]` layout,
//! and the out projection reads the attention output `[batch.., len, heads, depth]` as `[M,
//! heads·depth]` directly: no transposes, no copies between the GEMMs and the attention.

use std::borrow::Cow;

use half::{bf16, f16};

use super::view::Floats;
use crate::array::{Array, ArrayData};
use crate::element::DType;
use crate::error::{AttnError, try_filled};
use crate::kernel::gemm::{MatMut, MatRef, gemm};

/// `promote_dtype(inputs, kernel, bias, dtype=dtype)`: the dtype a projection computes in.
pub(crate) fn dense_dtype(
    input: DType,
    kernel: &Array,
    bias: Option<&Array>,
    dtype: Option<DType>,
) -> DType {
    dtype.unwrap_or_else(|| {
        let d = input.promote(kernel.dtype());
        bias.map_or(d, |b| d.promote(b.dtype()))
    })
}

/// The elements of `x` as `f32` after rounding them to `comp` (borrowed when `x` is f32 and
/// `comp` is f32).
fn as_f32<'x>(x: &'x Floats<'_>, comp: DType) -> Cow<'x, [f32]> {
    match (x, comp) {
        (Floats::F32(v), DType::F32) => Cow::Borrowed(v),
        // A 16-bit value is exact in f32 and in its own type (no rounding to do): a plain
        // widening, which the per-element path below made 10 times slower than the bf16 GEMM.
        (Floats::BF16(v), DType::BF16 | DType::F32) => {
            Cow::Owned(v.iter().map(|x| x.to_f32()).collect())
        }
        (Floats::F16(v), DType::F16 | DType::F32) => {
            Cow::Owned(v.iter().map(|x| x.to_f32()).collect())
        }
        // An f32 value rounded once to the 16-bit type (as from its f64 value: the same number).
        (Floats::F32(v), DType::BF16) => {
            Cow::Owned(v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
        }
        (Floats::F32(v), DType::F16) => {
            Cow::Owned(v.iter().map(|&x| f16::from_f32(x).to_f32()).collect())
        }
        _ => Cow::Owned(
            (0..x.len())
                .map(|i| comp.round_f64(x.get(i)) as f32)
                .collect(),
        ),
    }
}

fn as_f64<'x>(x: &'x Floats<'_>) -> Cow<'x, [f64]> {
    match x {
        Floats::F64(v) => Cow::Borrowed(v),
        _ => Cow::Owned((0..x.len()).map(|i| x.get(i)).collect()),
    }
}

/// An [`Array`]'s float elements as [`Floats`] (borrowed).
pub(crate) fn floats_of(a: &Array) -> Floats<'_> {
    match a.data() {
        ArrayData::F32(v) => Floats::F32(Cow::Borrowed(v)),
        ArrayData::F64(v) => Floats::F64(Cow::Borrowed(v)),
        ArrayData::BF16(v) => Floats::BF16(Cow::Borrowed(v)),
        ArrayData::F16(v) => Floats::F16(Cow::Borrowed(v)),
        // Parameters are validated float arrays; anything else reads as its f64 values.
        _ => Floats::F64(Cow::Owned(a.to_f64_vec())),
    }
}

/// `y[m, n] = sum_k x[m, k] · w[k, n] + b[n]` in `comp` with Flax's rounding points: inputs,
/// kernel and bias cast to `comp`, the dot product rounded once to `comp` (bf16/f16 accumulate
/// in f32, as XLA on the CPU), then the bias added in `comp` (a second rounding).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense(
    name: &'static str,
    x: &Floats<'_>,
    m: usize,
    k: usize,
    kernel: &Array,
    bias: Option<&Array>,
    n: usize,
    comp: DType,
) -> Result<ArrayData, AttnError> {
    let len = m.checked_mul(n).ok_or_else(|| AttnError::Overflow {
        tensor: name,
        shape: vec![m, n],
    })?;
    let mismatch = || AttnError::Length {
        tensor: name,
        shape: vec![m, k],
        expected: m.saturating_mul(k),
        found: x.len(),
    };
    let w = floats_of(kernel);
    let b = bias.map(floats_of);
    match comp {
        DType::F64 => {
            let a = as_f64(x);
            let wk = as_f64(&w);
            let mut c = try_filled(name, len, 0.0f64)?;
            product(&a, &wk, &mut c, m, k, n).ok_or_else(mismatch)?;
            if let Some(b) = &b {
                for row in c.chunks_exact_mut(n.max(1)) {
                    for (j, y) in row.iter_mut().enumerate() {
                        *y += b.get(j);
                    }
                }
            }
            Ok(ArrayData::F64(c))
        }
        DType::F32 => {
            let a = as_f32(x, comp);
            let wk = as_f32(&w, comp);
            let mut c = try_filled(name, len, 0.0f32)?;
            product(&a, &wk, &mut c, m, k, n).ok_or_else(mismatch)?;
            if let Some(b) = &b {
                let bias: Vec<f32> = (0..n).map(|j| b.get(j) as f32).collect();
                for row in c.chunks_exact_mut(n.max(1)) {
                    for (y, &bj) in row.iter_mut().zip(&bias) {
                        *y += bj;
                    }
                }
            }
            Ok(ArrayData::F32(c))
        }
        DType::BF16 | DType::F16 => {
            let a = as_f32(x, comp);
            let wk = as_f32(&w, comp);
            let mut c = try_filled(name, len, 0.0f32)?;
            product(&a, &wk, &mut c, m, k, n).ok_or_else(mismatch)?;
            let bias: Option<Vec<f32>> =
                b.map(|b| (0..n).map(|j| comp.round_f64(b.get(j)) as f32).collect());
            // Round the f32 dot to `comp`, add the bias in f32 (exact for two values of a
            // 16-bit type up to the final rounding) and round again.
            // (`f32 → 16-bit` rounds as `f64 → 16-bit` does for the same value.)
            let round_comp = |y: f32| -> f32 {
                if comp == DType::BF16 {
                    bf16::from_f32(y).to_f32()
                } else {
                    f16::from_f32(y).to_f32()
                }
            };
            let round = |y: f32, j: usize| -> f32 {
                let y = round_comp(y);
                match &bias {
                    Some(bias) => round_comp(y + bias[j]),
                    None => y,
                }
            };
            let idx = |i: usize| i % n.max(1);
            Ok(if comp == DType::BF16 {
                ArrayData::BF16(
                    c.iter()
                        .enumerate()
                        .map(|(i, &y)| bf16::from_f32(round(y, idx(i))))
                        .collect(),
                )
            } else {
                ArrayData::F16(
                    c.iter()
                        .enumerate()
                        .map(|(i, &y)| f16::from_f32(round(y, idx(i))))
                        .collect(),
                )
            })
        }
        other => Err(AttnError::InvalidArgument {
            argument: "dtype",
            reason: format!("must be a float dtype, found {other}"),
        }),
    }
}

/// `c ← a · w` for row-major `a [m, k]`, `w [k, n]`, `c [m, n]`; `None` if a slice is too short.
fn product<T: crate::kernel::gemm::GemmScalar + Default + One>(
    a: &[T],
    w: &[T],
    c: &mut [T],
    m: usize,
    k: usize,
    n: usize,
) -> Option<()> {
    if a.len() != m.checked_mul(k)? || w.len() != k.checked_mul(n)? {
        return None;
    }
    if m == 0 || n == 0 {
        return Some(());
    }
    if k == 0 {
        c.fill(T::default());
        return Some(());
    }
    let a = MatRef::row_major(a, m, k)?;
    let w = MatRef::row_major(w, k, n)?;
    let mut c = MatMut::row_major(c, m, n)?;
    gemm(<T as One>::one(), a, w, &mut c);
    Some(())
}

trait One {
    fn one() -> Self;
}
impl One for f32 {
    fn one() -> Self {
        1.0
    }
}
impl One for f64 {
    fn one() -> Self {
        1.0
    }
}

/// Flax's `LayerNorm(use_bias=False, epsilon=1e-6)` over the last axis (size `d`) of `x`:
/// statistics in `promote(dtype or x.dtype, float32)`, `var = max(0, mean(x²) - mean²)`,
/// `y = (x - mean) · (rsqrt(var + eps) · scale)`, cast to `dtype` or `result_type(x, scale)`.
/// Every arithmetic step is rounded to the statistics dtype (f64 operations rounded to f32 give
/// the f32 results exactly).
pub(crate) fn layer_norm(
    x: &Array,
    d: usize,
    scale: &Array,
    dtype: Option<DType>,
) -> Result<Array, AttnError> {
    const EPSILON: f64 = 1e-6;
    let stats = dtype.unwrap_or(x.dtype()).promote(DType::F32);
    let out = dtype.unwrap_or_else(|| x.dtype().promote(scale.dtype()));
    let r = |v: f64| stats.round_f64(v);
    let xs = floats_of(x);
    let sc: Vec<f64> = scale.to_f64_vec().into_iter().map(r).collect();
    let mut y = try_filled("query_ln", xs.len(), 0.0f64)?;
    if d > 0 {
        for (row, yr) in y.chunks_exact_mut(d).enumerate() {
            let base = row * d;
            let (mut s1, mut s2) = (0.0, 0.0);
            for i in 0..d {
                let v = r(xs.get(base + i));
                s1 = r(s1 + v);
                s2 = r(s2 + r(v * v));
            }
            // jnp.mean divides the sum by the count.
            let mean = r(s1 / d as f64);
            let mean2 = r(s2 / d as f64);
            let var = r(mean2 - r(mean * mean)).max(0.0);
            let rs = r(1.0 / r(r(var + EPSILON).sqrt()));
            for i in 0..d {
                let v = r(xs.get(base + i));
                yr[i] = r(r(v - mean) * r(rs * sc[i]));
            }
        }
    }
    Array::from_f64(out, &y, x.shape().to_vec())
}
