//! The gradients of the Flax-style functions: [`dot_product_attention_vjp`] and
//! [`dot_product_attention_weights_vjp`] (docs/runtime.md, "Gradients").

use std::borrow::Cow;

use super::{FlaxArgs, Mode, Outcome, attend};
use crate::array::Array;
use crate::context::Context;
use crate::dim::Dim;
use crate::element::{DType, Element};
use crate::error::{AttnError, try_filled};
use crate::kernel::{self, Broadcast, Geometry, Grads, Mask, Options, Residuals};

/// The gradients a VJP returns, each with the shape and dtype of its input.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGrads {
    /// The gradient of `query`.
    pub query: Array,
    /// The gradient of `key` (in grouped-query attention, summed over each group's heads).
    pub key: Array,
    /// The gradient of `value`; `None` for the weights' VJP, which has no value.
    pub value: Option<Array>,
    /// The gradient of a float `bias`, in the bias's own shape (summed over the axes along
    /// which it broadcasts); `None` without a bias or for a bool/int bias.
    pub bias: Option<Array>,
}

/// The vector–Jacobian product of [`super::dot_product_attention`]: given the cotangent of its
/// output (`[batch..., q, heads, dv]`, the output's dtype), the gradients of query, key, value
/// and bias. `args` are the forward's (the same dropout seed regenerates the same mask). A sow
/// sink in `args` selects the materialized weights path (nothing is sown); without one the
/// tiled backward runs.
pub fn dot_product_attention_vjp(
    query: &Array,
    key: &Array,
    value: &Array,
    cotangent: &Array,
    args: FlaxArgs<'_>,
) -> Result<AttentionGrads, AttnError> {
    into_grads(attend(
        query,
        key,
        Some(value),
        Mode::Vjp { cotangent },
        args,
    )?)
}

/// [`super::dot_product_attention`] that also returns what [`dot_product_attention_bwd`]
/// needs (the pair `jax.custom_vjp` calls `fwd` and `bwd`): the output, and the
/// [`Residuals`]: each row's logsumexp and a fingerprint of the call. Same arguments and
/// errors as the forward.
///
/// ```
/// # use attn_runtime::{Array, FlaxArgs, dot_product_attention_bwd, dot_product_attention_fwd};
/// let x = Array::new(vec![0.5f32; 2 * 4 * 8], vec![2, 4, 8]).unwrap(); // [q, heads, depth]
/// let (out, saved) = dot_product_attention_fwd(&x, &x, &x, FlaxArgs::new())?;
/// let cotangent = Array::new(vec![1.0f32; 2 * 4 * 8], vec![2, 4, 8]).unwrap(); // dLoss/dOut
/// let grads = dot_product_attention_bwd(&x, &x, &x, &out, &saved, &cotangent, FlaxArgs::new())?;
/// assert_eq!(grads.query.shape(), x.shape());
/// # Ok::<(), attn_runtime::AttnError>(())
/// ```
pub fn dot_product_attention_fwd(
    query: &Array,
    key: &Array,
    value: &Array,
    args: FlaxArgs<'_>,
) -> Result<(Array, Residuals), AttnError> {
    match attend(query, key, Some(value), Mode::ForwardSaving, args)? {
        Outcome::Saved(out, residuals) => Ok((out, residuals)),
        _ => Err(AttnError::InvalidArgument {
            argument: "residuals",
            reason: "internal error: the forward kept no residuals".into(),
        }),
    }
}

/// The backward of [`dot_product_attention_fwd`]: the gradients of query, key, value and bias
/// (as [`dot_product_attention_vjp`] returns them) from the forward's `output` and
/// `residuals` and the output's `cotangent`. `args` must be the forward's (the same dropout
/// generator). Without a sow sink it reads each row's saved logsumexp and `output` instead of
/// recomputing them: one sweep over the keys instead of two. Residuals or an output of
/// another call are [`AttnError::InvalidArgument`] (`argument: "residuals"`).
pub fn dot_product_attention_bwd(
    query: &Array,
    key: &Array,
    value: &Array,
    output: &Array,
    residuals: &Residuals,
    cotangent: &Array,
    args: FlaxArgs<'_>,
) -> Result<AttentionGrads, AttnError> {
    let mode = Mode::Bwd {
        output,
        residuals,
        cotangent,
    };
    into_grads(attend(query, key, Some(value), mode, args)?)
}

/// The vector–Jacobian product of [`super::dot_product_attention_weights`]: given the cotangent
/// of the weights (`[batch..., heads, q, kv]`, the weights' dtype), the gradients of query, key
/// and bias (`value` is `None`).
pub fn dot_product_attention_weights_vjp(
    query: &Array,
    key: &Array,
    cotangent: &Array,
    args: FlaxArgs<'_>,
) -> Result<AttentionGrads, AttnError> {
    into_grads(attend(query, key, None, Mode::Vjp { cotangent }, args)?)
}

fn into_grads(o: Outcome) -> Result<AttentionGrads, AttnError> {
    match o {
        Outcome::Grads(g) => Ok(g),
        Outcome::Forward(_) | Outcome::Saved(..) => Err(AttnError::InvalidArgument {
            argument: "cotangent",
            reason: "internal error: no gradients computed".into(),
        }),
    }
}

/// The cotangent must have the shape and dtype of the forward's result `what`.
pub(super) fn check_cotangent<R: Element>(
    c: &Array,
    shape: &[usize],
    what: &str,
) -> Result<(), AttnError> {
    if c.shape() != shape {
        return Err(AttnError::InvalidArgument {
            argument: "cotangent",
            reason: format!(
                "expected the shape of the {what}, {shape:?}, found {:?}",
                c.shape()
            ),
        });
    }
    if c.dtype() != R::DTYPE {
        return Err(AttnError::DType {
            tensor: "cotangent",
            expected: R::DTYPE,
            found: c.dtype(),
        });
    }
    Ok(())
}

/// The forward's output handed to a backward must have the output's shape and dtype.
pub(super) fn check_output<R: Element>(output: &Array, shape: &[usize]) -> Result<(), AttnError> {
    if output.shape() != shape {
        return Err(AttnError::InvalidArgument {
            argument: "output",
            reason: format!(
                "expected the forward's output, of shape {shape:?}, found {:?}",
                output.shape()
            ),
        });
    }
    if output.dtype() != R::DTYPE {
        return Err(AttnError::DType {
            tensor: "output",
            expected: R::DTYPE,
            found: output.dtype(),
        });
    }
    Ok(())
}

/// The caller's arrays (their shapes and dtypes are those of the gradients).
pub(super) struct Inputs<'x> {
    pub query: &'x Array,
    pub key: &'x Array,
    pub value: Option<&'x Array>,
    pub bias: Option<&'x Array>,
}

/// The kernel operands (cast to the computation dtype, broadcast to the call's layout).
pub(super) struct Operands<'o, 'x, E, B> {
    pub query: &'o [E],
    pub key: &'o [E],
    pub value: Option<&'o [E]>,
    pub bias: Option<&'o Broadcast<'x, B>>,
}

/// Runs the kernel's backward and returns the gradients in the inputs' shapes and dtypes;
/// with `saved` (the forward's output and residuals), [`kernel::attention_bwd`].
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<E: Element, B: Element, R: Element>(
    geom: &Geometry<'_, usize, usize, usize, usize>,
    ops: Operands<'_, '_, E, B>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    cotangent: &Array,
    saved: Option<(&Array, &Residuals)>,
    inputs: Inputs<'_>,
) -> Result<AttentionGrads, AttnError> {
    let cot: Cow<'_, [R]> = super::expand::cast::<R>("cotangent", cotangent)?;
    let mut gq = try_filled("grad query", ops.query.len(), E::default())?;
    let mut gk = try_filled("grad key", ops.key.len(), E::default())?;
    let mut gv = try_filled("grad value", ops.value.map_or(0, <[E]>::len), E::default())?;
    // JAX differentiates a float bias only.
    let bias_grad = inputs.bias.filter(|b| b.dtype().is_float()).is_some();
    let mut gb = match (ops.bias, bias_grad) {
        (Some(b), true) => Some(try_filled("grad bias", b.data().len(), B::default())?),
        _ => None,
    };
    let grads = Grads {
        query: &mut gq,
        key: &mut gk,
        value: &mut gv,
        bias: gb.as_deref_mut(),
    };
    let saved_output: Option<Cow<'_, [R]>> = saved
        .map(|(o, _)| super::expand::cast::<R>("output", o))
        .transpose()?;
    match (ops.value, saved, saved_output.as_deref()) {
        (Some(v), Some((_, residuals)), Some(output)) => kernel::attention_bwd(
            geom, ops.query, ops.key, v, ops.bias, mask, opts, ctx, output, residuals, &cot, grads,
        )?,
        (Some(v), _, _) => kernel::attention_backward(
            geom, ops.query, ops.key, v, ops.bias, mask, opts, ctx, &cot, grads,
        )?,
        (None, _, _) => kernel::attention_weights_backward(
            geom, ops.query, ops.key, ops.bias, mask, opts, ctx, &cot, grads,
        )?,
    }
    let layout = |len: usize, heads: usize, depth: usize| {
        let mut s = geom.batch_shape.to_vec();
        s.extend_from_slice(&[len, heads, depth]);
        s
    };
    let (hq, hk) = (geom.heads.size(), geom.kv_heads.size());
    let query = fit_back(
        gq,
        &layout(geom.q_len, hq, geom.qk_depth.size()),
        inputs.query,
    )?;
    let key = fit_back(
        gk,
        &layout(geom.kv_len, hk, geom.qk_depth.size()),
        inputs.key,
    )?;
    let value = match inputs.value {
        Some(v) => Some(fit_back(
            gv,
            &layout(geom.kv_len, hk, geom.v_depth.size()),
            v,
        )?),
        None => None,
    };
    let bias = match (gb, inputs.bias) {
        (Some(g), Some(b)) => {
            let f: Vec<f64> = g.iter().map(|x| x.to_f64()).collect();
            Some(Array::from_f64(b.dtype(), &f, b.shape().to_vec())?)
        }
        _ => None,
    };
    Ok(AttentionGrads {
        query,
        key,
        value,
        bias,
    })
}

/// A gradient computed in the call's layout `shape`, summed back to the input's shape (when a
/// bias or mask enlarged the layout) and cast to the input's dtype (moved as it is when both
/// already agree).
fn fit_back<E: Element>(g: Vec<E>, shape: &[usize], input: &Array) -> Result<Array, AttnError> {
    let dtype = if input.dtype().is_float() {
        input.dtype()
    } else {
        DType::F32
    };
    if shape == input.shape() && dtype == E::DTYPE {
        return Array::new(g, shape.to_vec());
    }
    let f: Vec<f64> = g.iter().map(|x| x.to_f64()).collect();
    let f = if shape == input.shape() {
        f
    } else {
        kernel::sum_to_shape(&f, shape, input.shape())?
    };
    Array::from_f64(dtype, &f, input.shape().to_vec())
}
