//! The gradients of [`MultiHeadDotProductAttention`]: [`MultiHeadDotProductAttention::vjp`]
//! runs the forward and returns a [`MhaPullback`], whose [`MhaPullback::backward`] maps the
//! output's cotangent to the gradients of the inputs and of every parameter ([`MhaGrads`]), as
//! `jax.vjp` of `module.apply` does.
//!
//! The backward of each step of the forward, in reverse:
//! - out projection `y = o·Wo + bo`: `dWo = oᵀ·dy`, `dbo = Σ_rows dy`, `do = dy·Woᵀ`;
//! - attention: the tiled backward of [`crate::dot_product_attention_bwd`] from the forward's
//!   residuals (dropout regenerated from the same generator);
//! - LayerNorm (`normalize_qk`) `y = x̂·s`, `x̂ = (x − μ)·r`: `ds = Σ_rows dy ⊙ x̂`,
//!   `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))` with `g = dy ⊙ s`;
//! - projections `p = x·W + b`: `dW = xᵀ·dp`, `db = Σ_rows dp`, `dx = dp·Wᵀ`; an input that
//!   feeds several projections (self-attention: `inputs_q` is also key and value) gets the sum.
//!
//! Arithmetic is f64 when the computation dtype is f64, else f32 (the GEMMs of
//! `kernel::gemm`); every gradient is returned in its primal's dtype.

use super::projection::floats_of;
use super::view::{ArrayRef, Floats};
use super::{Dense, MhaParams, MultiHeadDotProductAttention};
use crate::array::Array;
use crate::context::Context;
use crate::element::DType;
use crate::error::{AttnError, try_filled};
use crate::flax::{dot_product_attention_bwd, dot_product_attention_fwd};
use crate::kernel::gemm::{GemmScalar, MatMut, MatRef, gemm};
use crate::kernel::{Align, Residuals};

/// The gradients of a [`MhaPullback`]: the inputs' and every parameter's, each with its
/// primal's shape and dtype. [`MhaGrads`] holds the inputs as [`Array`]s; the pullback of an
/// `attention!` projection layer returns them as typed [`Tensor`](crate::Tensor)s of the
/// inputs' declared shapes (`()` for an input the layer does not take), so its signature
/// spells every gradient's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGradients<Q, K = (), V = ()> {
    /// The gradient of `inputs_q` (in self-attention, the sum of its query, key and value
    /// paths).
    pub inputs_q: Q,
    /// The gradient of `inputs_k` (with its value path when there is no `inputs_v`).
    pub inputs_k: K,
    /// The gradient of `inputs_v`.
    pub inputs_v: V,
    /// The gradient of every parameter, as a parameter tree of the layer's shapes and dtypes.
    pub params: MhaParams,
}

/// What [`MhaPullback::backward`] returns: `inputs_k` and `inputs_v` are `Some` when they were
/// passed.
pub type MhaGrads = LayerGradients<Array, Option<Array>, Option<Array>>;

/// What [`MultiHeadDotProductAttention::vjp`] keeps for the backward: the inputs (borrowed),
/// the projected query, key and value, the attention output and its [`Residuals`]. Like the
/// function `jax.vjp` returns, it belongs to one call of one layer.
#[derive(Debug)]
pub struct MhaPullback<'a> {
    layer: &'a MultiHeadDotProductAttention,
    inputs_q: ArrayRef<'a>,
    inputs_k: Option<ArrayRef<'a>>,
    inputs_v: Option<ArrayRef<'a>>,
    /// The forward's mask (a copy: the pullback must outlive a mask built for the call).
    mask: Option<Array>,
    causal: Option<Align>,
    /// The projections before the LayerNorm (`normalize_qk` only).
    q_pre: Option<Array>,
    k_pre: Option<Array>,
    /// The attention's query, key, value and output `[batch.., len, heads, D]`.
    q: Array,
    k: Array,
    v: Array,
    o: Array,
    residuals: Residuals,
    /// The output's shape and dtype (the cotangent's).
    output_shape: Vec<usize>,
    output_dtype: DType,
}

impl MultiHeadDotProductAttention {
    /// The forward of [`forward_causal_views`](Self::forward_causal_views) that also returns
    /// its pullback: `let (y, pullback) = layer.vjp(..)?; let grads = pullback.backward(&dy,
    /// &mut ctx)?;` (`jax.vjp` of `module.apply`). `ctx` is the forward's (its dropout
    /// generator is regenerated in the backward; a sow sink receives the weights here only).
    ///
    /// ```
    /// use attn_runtime::layer::{ArrayRef, InFeatures, MhaConfig, MultiHeadDotProductAttention};
    /// use attn_runtime::{Array, Context, DropoutRng};
    ///
    /// let mut config = MhaConfig::new(4);
    /// config.dropout_rate = 0.1;
    /// let layer = MultiHeadDotProductAttention::init(config, InFeatures::same(32), 0)?;
    /// let x = Array::new(vec![0.25f32; 2 * 5 * 32], [2, 5, 32])?;
    /// let step = || Context::default().set_deterministic(false).dropout_rng(DropoutRng::new(7));
    /// let x_ref = ArrayRef::from_array("inputs_q", &x)?;
    /// let (y, pullback) = layer.vjp(x_ref, None, None, None, None, &mut step())?;
    /// let dy = Array::new(vec![1.0f32; y.len()], y.shape().to_vec())?; // d loss / d y
    /// let grads = pullback.backward(&dy, &mut step())?;
    /// assert_eq!(grads.inputs_q.shape(), x.shape());
    /// assert_eq!(grads.params.query.kernel.shape(), layer.params().query.kernel.shape());
    /// # Ok::<(), attn_runtime::AttnError>(())
    /// ```
    pub fn vjp<'a>(
        &'a self,
        inputs_q: ArrayRef<'a>,
        inputs_k: Option<ArrayRef<'a>>,
        inputs_v: Option<ArrayRef<'a>>,
        mask: Option<&Array>,
        causal: Option<Align>,
        ctx: &mut Context<'_>,
    ) -> Result<(Array, MhaPullback<'a>), AttnError> {
        let p = self.projected(&inputs_q, inputs_k.as_ref(), inputs_v.as_ref())?;
        let (o, residuals) = {
            let args = self.attention_args(mask, causal, ctx, true);
            dot_product_attention_fwd(&p.q, &p.k, &p.v, args)?
        };
        let y = self.project_out(&o)?;
        let pullback = MhaPullback {
            layer: self,
            inputs_q,
            inputs_k,
            inputs_v,
            mask: mask.cloned(),
            causal,
            q_pre: p.q_pre,
            k_pre: p.k_pre,
            q: p.q,
            k: p.k,
            v: p.v,
            o,
            residuals,
            output_shape: y.shape().to_vec(),
            output_dtype: y.dtype(),
        };
        Ok((y, pullback))
    }
}

impl MhaPullback<'_> {
    /// The gradients of the inputs and parameters given `cotangent`, the gradient of the loss
    /// with respect to the output (its shape and dtype). `ctx` must carry the forward's
    /// dropout generator and `deterministic` (a different one is
    /// [`AttnError::InvalidArgument`] naming `residuals`).
    pub fn backward(
        &self,
        cotangent: &Array,
        ctx: &mut Context<'_>,
    ) -> Result<MhaGrads, AttnError> {
        if cotangent.shape() != self.output_shape.as_slice() {
            return Err(AttnError::InvalidArgument {
                argument: "cotangent",
                reason: format!(
                    "expected the shape of the output, {:?}, found {:?}",
                    self.output_shape,
                    cotangent.shape()
                ),
            });
        }
        if cotangent.dtype() != self.output_dtype {
            return Err(AttnError::DType {
                tensor: "cotangent",
                expected: self.output_dtype,
                found: cotangent.dtype(),
            });
        }
        if self.q.dtype() == DType::F64 {
            self.backward_in::<f64>(cotangent, ctx)
        } else {
            self.backward_in::<f32>(cotangent, ctx)
        }
    }

    fn backward_in<T: Arith>(
        &self,
        cotangent: &Array,
        ctx: &mut Context<'_>,
    ) -> Result<MhaGrads, AttnError> {
        let layer = self.layer;
        let dims = layer.dims;
        let params = &layer.params;
        let hd = dims.heads * dims.head_dim;
        let rows_q = self.q.len().checked_div(hd).unwrap_or(0);

        // The out projection.
        let dy = T::vec_of(&floats_of(cotangent));
        let o = T::vec_of(&floats_of(&self.o));
        let (d_out, d_o) = dense_backward::<T>("out", &o, &params.out, &dy, rows_q)?;
        let d_o = T::array(d_o, self.o.dtype(), self.o.shape())?;

        // The attention core, from the forward's residuals.
        let grads = {
            let args = layer.attention_args(self.mask.as_ref(), self.causal, ctx, false);
            dot_product_attention_bwd(
                &self.q,
                &self.k,
                &self.v,
                &self.o,
                &self.residuals,
                &d_o,
                args,
            )?
        };
        let dv = grads.value.ok_or_else(|| internal("no value gradient"))?;

        // The LayerNorms, then the query/key/value projections.
        let (dq, d_query_ln) = ln_backward::<T>(&self.q_pre, &params.query_ln, &grads.query)?;
        let (dk, d_key_ln) = ln_backward::<T>(&self.k_pre, &params.key_ln, &grads.key)?;
        let k_in = self.inputs_k.as_ref().unwrap_or(&self.inputs_q);
        let v_in = self.inputs_v.as_ref().unwrap_or(k_in);
        let x_q = T::vec_of(self.inputs_q.data());
        let (d_query, mut dx_q) = dense_backward::<T>("query", &x_q, &params.query, &dq, rows_q)?;
        let x_k = T::vec_of(k_in.data());
        let rows_k = x_k.len().checked_div(dims.features.k).unwrap_or(0);
        let (d_key, dx_k) = dense_backward::<T>("key", &x_k, &params.key, &dk, rows_k)?;
        let x_v = T::vec_of(v_in.data());
        let dv = T::vec_of(&floats_of(&dv));
        let (d_value, dx_v) = dense_backward::<T>("value", &x_v, &params.value, &dv, rows_k)?;

        // Inputs that feed several projections get the sum of their paths.
        let (inputs_k, inputs_v) = match (&self.inputs_k, &self.inputs_v) {
            (None, _) => {
                add_into(&mut dx_q, &dx_k);
                add_into(&mut dx_q, &dx_v);
                (None, None)
            }
            (Some(k), None) => {
                let mut dx_k = dx_k;
                add_into(&mut dx_k, &dx_v);
                (Some(T::array(dx_k, k.dtype(), k.shape())?), None)
            }
            (Some(k), Some(v)) => (
                Some(T::array(dx_k, k.dtype(), k.shape())?),
                Some(T::array(dx_v, v.dtype(), v.shape())?),
            ),
        };
        Ok(MhaGrads {
            inputs_q: T::array(dx_q, self.inputs_q.dtype(), self.inputs_q.shape())?,
            inputs_k,
            inputs_v,
            params: MhaParams {
                query: d_query,
                key: d_key,
                value: d_value,
                out: d_out,
                query_ln: d_query_ln,
                key_ln: d_key_ln,
            },
        })
    }
}

/// An internal invariant of the backward broken (a bug, never the caller's input).
fn internal(what: &str) -> AttnError {
    AttnError::InvalidArgument {
        argument: "layer",
        reason: format!("internal error: {what}"),
    }
}

/// The arithmetic type of the backward: `f32` or `f64`.
trait Arith: GemmScalar + Copy + Default + std::ops::AddAssign + std::ops::Mul<Output = Self> {
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;

    /// The elements of `x` in this type.
    fn vec_of(x: &Floats<'_>) -> Vec<Self> {
        (0..x.len()).map(|i| Self::from_f64(x.get(i))).collect()
    }

    /// `values` as an array of `dtype` (rounded to nearest) and `shape`.
    fn array(values: Vec<Self>, dtype: DType, shape: &[usize]) -> Result<Array, AttnError> {
        let wide: Vec<f64> = values.into_iter().map(Self::to_f64).collect();
        Array::from_f64(dtype, &wide, shape.to_vec())
    }
}

impl Arith for f32 {
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Arith for f64 {
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// `a [m, k] · b [k, n]` for strided views; zeros when a dimension is empty.
fn product<T: Arith>(
    name: &'static str,
    a: Option<MatRef<'_, T>>,
    b: Option<MatRef<'_, T>>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<T>, AttnError> {
    let len = m.checked_mul(n).ok_or_else(|| AttnError::Overflow {
        tensor: name,
        shape: vec![m, n],
    })?;
    let mut c = try_filled(name, len, T::default())?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(c);
    }
    let (Some(a), Some(b)) = (a, b) else {
        return Err(internal("a projection's operands disagree with its shapes"));
    };
    let mut view = MatMut::row_major(&mut c, m, n)
        .ok_or_else(|| internal("a projection's result disagrees with its shape"))?;
    gemm(T::ONE, a, b, &mut view);
    Ok(c)
}

/// The backward of `y [m, n] = x [m, k] · W [k, n] + b`: the parameters' gradients (a
/// [`Dense`] of `p`'s shapes and dtypes) and the gradient of `x`.
fn dense_backward<T: Arith>(
    name: &'static str,
    x: &[T],
    p: &Dense,
    dy: &[T],
    m: usize,
) -> Result<(Dense, Vec<T>), AttnError> {
    let w = T::vec_of(&floats_of(&p.kernel));
    let n = dy.len().checked_div(m).unwrap_or(0);
    let k = w.len().checked_div(n).unwrap_or(0);
    if x.len() != m * k || dy.len() != m * n || w.len() != k * n {
        return Err(internal(
            "a projection's gradient disagrees with its shapes",
        ));
    }
    // dW = xᵀ · dy: xᵀ is [k, m] with row stride 1 and column stride k.
    let dw = product(
        name,
        MatRef::new(x, 0, k, m, 1, k),
        MatRef::row_major(dy, m, n),
        (k, m, n),
    )?;
    // dx = dy · Wᵀ: Wᵀ is [n, k] with row stride 1 and column stride n.
    let dx = product(
        name,
        MatRef::row_major(dy, m, n),
        MatRef::new(&w, 0, n, k, 1, n),
        (m, n, k),
    )?;
    let kernel = T::array(dw, p.kernel.dtype(), p.kernel.shape())?;
    let bias = match &p.bias {
        Some(b) => {
            let mut db = vec![T::default(); n];
            for row in dy.chunks_exact(n.max(1)) {
                add_into(&mut db, row);
            }
            Some(T::array(db, b.dtype(), b.shape())?)
        }
        None => None,
    };
    Ok((Dense { kernel, bias }, dx))
}

fn add_into<T: Arith>(acc: &mut [T], x: &[T]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// The backward of the LayerNorm `y = (x − μ)·r·s` over the last axis of `x_pre` (the
/// projection before it), given `dy`; without a LayerNorm, `dy` itself. Returns the gradient of
/// `x_pre` and of the scale `s`.
fn ln_backward<T: Arith>(
    x_pre: &Option<Array>,
    scale: &Option<Array>,
    dy: &Array,
) -> Result<(Vec<T>, Option<Array>), AttnError> {
    let dy = floats_of(dy);
    let (Some(x), Some(scale)) = (x_pre, scale) else {
        return Ok((T::vec_of(&dy), None));
    };
    const EPSILON: f64 = 1e-6;
    let d = scale.len();
    let s = scale.to_f64_vec();
    let xs = x.to_f64_vec();
    let mut dx = try_filled("query_ln", xs.len(), T::default())?;
    let mut ds = vec![0.0f64; d];
    if d > 0 {
        for (row, dxr) in dx.chunks_exact_mut(d).enumerate() {
            let base = row * d;
            let xr = &xs[base..base + d];
            let mean = xr.iter().sum::<f64>() / d as f64;
            let var = (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 - mean * mean).max(0.0);
            let r = 1.0 / (var + EPSILON).sqrt();
            let (mut mean_g, mut mean_gx) = (0.0, 0.0);
            for i in 0..d {
                let xhat = (xr[i] - mean) * r;
                let g = dy.get(base + i) * s[i];
                ds[i] += dy.get(base + i) * xhat;
                mean_g += g;
                mean_gx += g * xhat;
            }
            mean_g /= d as f64;
            mean_gx /= d as f64;
            for i in 0..d {
                let xhat = (xr[i] - mean) * r;
                let g = dy.get(base + i) * s[i];
                dxr[i] = T::from_f64(r * (g - mean_g - xhat * mean_gx));
            }
        }
    }
    let ds = Array::from_f64(scale.dtype(), &ds, scale.shape().to_vec())?;
    Ok((dx, Some(ds)))
}
