//! A `jax.nn.dot_product_attention`-style entry point, for users porting JAX code: the
//! parameters and the numerics of `jax.nn.dot_product_attention` (jax 0.10, `implementation =
//! "xla"`), which differ from Flax's (see `docs/runtime.md`, "jax.nn semantics"):
//!
//! - inputs are `[B, T, N, H]` or `[T, N, H]`; key and value `[B?, S, K, H]` with `K` dividing
//!   `N` (grouped-query attention: query head `n` reads key/value head `n / (N / K)`);
//! - the logits are float32 for 16-bit inputs (float64 for float64), and `scale` multiplies them
//!   **after** the dot product (default `1 / sqrt(H)` rounded to the logits dtype);
//! - masked logits become `-0.7 · f32::MAX` (not `finfo.min`), the softmax runs in float32 even
//!   for float64 inputs, and the probabilities are rounded to the input dtype;
//! - rows that see no key are uniform over all keys, and padded query rows
//!   (`t >= query_seq_lengths[b]`) are then zeroed;
//! - the residual (`return_residual`) is the logsumexp of the masked float32 logits, `[B?, T, N]`
//!   in the input dtype, taken from the tiled output path's online softmax.
//!
//! `bias` and `mask` of rank below 4 get leading 1s (as jax does); their head axis must be 1 or
//! `N`; the mask must be `bool`; the lengths `int32` of shape `[B]` (`[1]` without a batch dim).

use crate::array::{Array, try_collect};
use crate::context::Context;
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements, try_filled};
use crate::flax::expand::cast;
use std::borrow::Cow;

use crate::flax::AttentionGrads;
use crate::kernel::{self, Align, Broadcast, Geometry, Grads, JaxOptions, Mask, Window};
use crate::sow::Sow;

/// The keyword arguments of `jax.nn.dot_product_attention`. `JaxArgs::default()` has jax's
/// defaults (no bias, mask or lengths, `scale = None`, not causal, no window, no residual).
#[derive(Default)]
pub struct JaxArgs<'a> {
    /// `bias`: added to the logits; rank 2 to 4, broadcast to `[B, N, T, S]` after leading 1s.
    pub bias: Option<&'a Array>,
    /// `mask`: `bool`, `true` attends; the same shapes as `bias`.
    pub mask: Option<&'a Array>,
    /// `scale`: multiplies the logits after the dot product; `None` = `1 / sqrt(H)`.
    pub scale: Option<f64>,
    /// `is_causal`: key `s` visible to query `t` iff `s <= t` (top-left aligned).
    pub is_causal: bool,
    /// `query_seq_lengths`: `int32 [B]`; rows `t >= len` are fully masked, then zeroed.
    pub query_seq_lengths: Option<&'a Array>,
    /// `key_value_seq_lengths`: `int32 [B]`; keys `s >= len` are masked.
    pub key_value_seq_lengths: Option<&'a Array>,
    /// `local_window_size = (left, right)`: visible iff `t - left <= s <= t + right` (an int `w`
    /// in jax is `(w, w)`).
    pub local_window_size: Option<(usize, usize)>,
    /// `return_residual`: also return the logsumexp of the logits, `[B?, T, N]`.
    pub return_residual: bool,
    /// Not a jax argument: a sow sink that receives the probabilities `[B, N, T, S]` (in the
    /// input dtype) under ("intermediates", "attention_weights"). Giving one computes the call
    /// on the materialized weights path (no residual there: `return_residual` is an error).
    pub module: Option<&'a mut dyn Sow>,
    /// Not a jax argument: the rayon pool to run on; `None` = the global pool.
    pub pool: Option<&'a rayon::ThreadPool>,
}

/// What [`dot_product_attention`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct JaxOutput {
    /// The output, of the query's shape and dtype.
    pub output: Array,
    /// With `return_residual`: the logsumexp, `query.shape[:-1]` in the input dtype.
    pub residual: Option<Array>,
}

/// `jax.nn.dot_product_attention(query, key, value, bias, mask, scale=, is_causal=,
/// query_seq_lengths=, key_value_seq_lengths=, local_window_size=, return_residual=)` with
/// jax's semantics (module docs).
pub fn dot_product_attention(
    query: &Array,
    key: &Array,
    value: &Array,
    args: JaxArgs<'_>,
) -> Result<JaxOutput, AttnError> {
    match dispatch(query, key, value, None, args)? {
        Computed::Forward(o) => Ok(o),
        Computed::Grads(_) => unreachable!("a forward call computed gradients"),
    }
}

/// The vector–Jacobian product of [`dot_product_attention`] (same arguments; `return_residual`
/// is ignored): given the cotangent of the output (the query's shape and dtype), the gradients
/// of query, key, value (summed over each group's query heads) and bias (its shape as passed).
/// Padded query rows (`query_seq_lengths`) pass no gradient, as in jax. A sow sink selects the
/// materialized backward (nothing is sown).
pub fn dot_product_attention_vjp(
    query: &Array,
    key: &Array,
    value: &Array,
    cotangent: &Array,
    mut args: JaxArgs<'_>,
) -> Result<AttentionGrads, AttnError> {
    args.return_residual = false;
    match dispatch(query, key, value, Some(cotangent), args)? {
        Computed::Grads(g) => Ok(g),
        Computed::Forward(_) => unreachable!("a backward call computed no gradients"),
    }
}

fn dispatch(
    query: &Array,
    key: &Array,
    value: &Array,
    cotangent: Option<&Array>,
    args: JaxArgs<'_>,
) -> Result<Computed, AttnError> {
    let shapes = Shapes::of(query, key, value)?;
    let dtype = query.dtype();
    match dtype {
        DType::F32 => run::<f32>(query, key, value, cotangent, &shapes, args),
        DType::F64 => run::<f64>(query, key, value, cotangent, &shapes, args),
        DType::BF16 => run::<half::bf16>(query, key, value, cotangent, &shapes, args),
        _ => run::<half::f16>(query, key, value, cotangent, &shapes, args),
    }
}

/// The sizes of a call: `[B, T, N, H]` with `B = 1` for rank-3 inputs.
struct Shapes {
    batched: bool,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    kv_heads: usize,
    depth: usize,
}

impl Shapes {
    fn of(query: &Array, key: &Array, value: &Array) -> Result<Self, AttnError> {
        let rank = query.ndim();
        if rank != 3 && rank != 4 {
            return Err(AttnError::Rank {
                tensor: "query",
                expected: "3 ([T, N, H]) or 4 ([B, T, N, H])".into(),
                found: query.shape().to_vec(),
            });
        }
        for (name, a) in [("key", key), ("value", value)] {
            if a.ndim() != rank {
                return Err(AttnError::Rank {
                    tensor: name,
                    expected: format!("{rank}, the rank of query"),
                    found: a.shape().to_vec(),
                });
            }
        }
        if !query.dtype().is_float() {
            return Err(AttnError::InvalidArgument {
                argument: "query",
                reason: format!("expected a float dtype, found {}", query.dtype()),
            });
        }
        for (name, a) in [("key", key), ("value", value)] {
            if a.dtype() != query.dtype() {
                return Err(AttnError::DType {
                    tensor: name,
                    expected: query.dtype(),
                    found: a.dtype(),
                });
            }
        }
        let pad = |s: &[usize]| -> Vec<usize> {
            if rank == 3 {
                std::iter::once(1).chain(s.iter().copied()).collect()
            } else {
                s.to_vec()
            }
        };
        let (q, k, v) = (pad(query.shape()), pad(key.shape()), pad(value.shape()));
        if v != k {
            let axis = (0..4).find(|&a| v[a] != k[a]).unwrap_or(0);
            return Err(AttnError::Axis {
                tensor: "value",
                axis: format!("axis {}", axis + rank - 4),
                expected: format!(
                    "{}: value must have the key's shape {:?}",
                    k[axis],
                    key.shape()
                ),
                found: v[axis],
            });
        }
        let names = ["batch (axis 0)", "", "", "head_dim (axis -1)"];
        for a in [0, 3] {
            if rank == 3 && a == 0 {
                continue;
            }
            if k[a] != q[a] {
                return Err(AttnError::Axis {
                    tensor: "key",
                    axis: names[a].into(),
                    expected: format!("{}, as in query", q[a]),
                    found: k[a],
                });
            }
        }
        let (heads, kv_heads) = (q[2], k[2]);
        if kv_heads == 0 && heads > 0 || kv_heads > 0 && !heads.is_multiple_of(kv_heads) {
            return Err(AttnError::Axis {
                tensor: "key",
                axis: "kv heads (axis -2)".into(),
                expected: format!("a divisor of the {heads} query heads"),
                found: kv_heads,
            });
        }
        Ok(Shapes {
            batched: rank == 4,
            batch: q[0],
            q_len: q[1],
            kv_len: k[1],
            heads,
            kv_heads,
            depth: q[3],
        })
    }

    /// `[B, N, T, S]`, the logits shape bias and mask broadcast to.
    fn logits(&self) -> [usize; 4] {
        [self.batch, self.heads, self.q_len, self.kv_len]
    }
}

/// A bias or mask padded to rank 4 with leading 1s; its head axis must be 1 or `N`.
fn rank4(name: &'static str, a: &Array, s: &Shapes) -> Result<Vec<usize>, AttnError> {
    if a.ndim() > 4 {
        return Err(AttnError::Rank {
            tensor: name,
            expected: "at most 4 ([B, N, T, S], leading 1s added)".into(),
            found: a.shape().to_vec(),
        });
    }
    let mut shape = vec![1; 4 - a.ndim()];
    shape.extend_from_slice(a.shape());
    let target = s.logits();
    for axis in 0..4 {
        if shape[axis] != 1 && shape[axis] != target[axis] {
            return Err(AttnError::Broadcast {
                tensor: name,
                shape: a.shape().to_vec(),
                target: target.to_vec(),
                axis: (axis + a.ndim()).saturating_sub(4),
            });
        }
    }
    Ok(shape)
}

/// A lengths argument: `int32` of shape `[B]` exactly, each in `0..=bound` (the sequence
/// length `what`); checked here so that the error names jax's argument.
fn lengths<'a>(
    name: &'static str,
    a: Option<&'a Array>,
    s: &Shapes,
    (bound, what): (usize, &str),
) -> Result<Option<&'a [i32]>, AttnError> {
    let Some(a) = a else { return Ok(None) };
    if a.dtype() != DType::I32 {
        return Err(AttnError::DType {
            tensor: name,
            expected: DType::I32,
            found: a.dtype(),
        });
    }
    if a.shape() != [s.batch] {
        return Err(AttnError::Axis {
            tensor: name,
            axis: "shape".into(),
            expected: format!(
                "[{}] (one length per batch element{})",
                s.batch,
                if s.batched {
                    ""
                } else {
                    "; [1] without a batch dim"
                }
            ),
            found: a.len(),
        });
    }
    let values = a.as_slice::<i32>().unwrap_or_default();
    if let Some((b, &n)) = values
        .iter()
        .enumerate()
        .find(|&(_, &n)| n < 0 || n as u64 > bound as u64)
    {
        return Err(AttnError::InvalidArgument {
            argument: name,
            reason: format!(
                "expected lengths in 0..={bound} (the {what}), found {n} at batch element {b}"
            ),
        });
    }
    Ok(Some(values))
}

fn run<E: Element>(
    query: &Array,
    key: &Array,
    value: &Array,
    cotangent: Option<&Array>,
    s: &Shapes,
    args: JaxArgs<'_>,
) -> Result<Computed, AttnError> {
    let bias_shape = args.bias.map(|b| rank4("bias", b, s)).transpose()?;
    let mask_shape = args.mask.map(|m| rank4("mask", m, s)).transpose()?;
    if let Some(m) = args.mask
        && m.dtype() != DType::Bool
    {
        return Err(AttnError::DType {
            tensor: "mask",
            expected: DType::Bool,
            found: m.dtype(),
        });
    }
    if let Some(b) = args.bias
        && !b.dtype().is_float()
    {
        return Err(AttnError::InvalidArgument {
            argument: "bias",
            reason: format!("expected a float dtype, found {}", b.dtype()),
        });
    }
    let query_lengths = lengths(
        "query_seq_lengths",
        args.query_seq_lengths,
        s,
        (s.q_len, "query length"),
    )?;
    let kv_lengths = lengths(
        "key_value_seq_lengths",
        args.key_value_seq_lengths,
        s,
        (s.kv_len, "key/value length"),
    )?;
    if args.return_residual && args.module.is_some() {
        return Err(AttnError::InvalidArgument {
            argument: "return_residual",
            reason: "expected no sow sink (module) with a residual: the residual comes from \
                     the tiled output path, a sink forces the weights path"
                .into(),
        });
    }
    let q = cast::<E>("query", query)?;
    let k = cast::<E>("key", key)?;
    let v = cast::<E>("value", value)?;
    // The bias is added in float32 (float64 for float64 inputs): jax promotes it with the
    // float32 logits. Its values are exact in either type.
    let logits_f64 = E::DTYPE == DType::F64;
    let bias_f32: Option<Cow<'_, [f32]>> = match (args.bias, logits_f64) {
        (Some(b), false) => Some(cast::<f32>("bias", b)?),
        _ => None,
    };
    let bias_f64: Option<Cow<'_, [f64]>> = match (args.bias, logits_f64) {
        (Some(b), true) => Some(cast::<f64>("bias", b)?),
        _ => None,
    };
    // `bool` was checked above: the mask is read in place.
    let mask_data = args.mask.and_then(|m| m.as_slice::<bool>());
    let mut mask = Mask::none();
    if let (Some(d), Some(shape)) = (&mask_data, &mask_shape) {
        mask = mask.with_dense(Broadcast::new("mask", d, shape)?);
    }
    if args.is_causal {
        mask = mask.with_causal(Align::TopLeft);
    }
    if let Some((left, right)) = args.local_window_size {
        mask = mask.with_window(Window {
            left,
            right,
            align: Align::TopLeft,
        });
    }
    if let Some(l) = query_lengths {
        mask = mask.with_query_lengths(l);
    }
    if let Some(l) = kv_lengths {
        mask = mask.with_kv_lengths(l);
    }
    let batch_shape = [s.batch];
    let geom = Geometry {
        batch_shape: &batch_shape,
        q_len: s.q_len,
        kv_len: s.kv_len,
        heads: s.heads,
        kv_heads: s.kv_heads,
        qk_depth: s.depth,
        v_depth: s.depth,
    };
    let opts = JaxOptions { scale: args.scale };
    let mut ctx = Context {
        deterministic: true,
        dropout_rng: None,
        sow: args.module,
        pool: args.pool,
    };
    if let Some(c) = cotangent {
        if c.shape() != query.shape() {
            return Err(AttnError::InvalidArgument {
                argument: "cotangent",
                reason: format!(
                    "expected the shape of the output, {:?}, found {:?}",
                    query.shape(),
                    c.shape()
                ),
            });
        }
        if c.dtype() != E::DTYPE {
            return Err(AttnError::DType {
                tensor: "cotangent",
                expected: E::DTYPE,
                found: c.dtype(),
            });
        }
        let c = cast::<E>("cotangent", c)?;
        let t = Tensors {
            q: &q,
            k: &k,
            v: &v,
        };
        let grads = match (&bias_f32, &bias_f64, &bias_shape) {
            (Some(b), _, Some(shape)) => {
                let b = Broadcast::new("bias", b, shape)?;
                vjp(&geom, t, Some(&b), &mask, &opts, &mut ctx, &c)?
            }
            (_, Some(b), Some(shape)) => {
                let b = Broadcast::new("bias", b, shape)?;
                vjp(&geom, t, Some(&b), &mask, &opts, &mut ctx, &c)?
            }
            _ => vjp::<E, f32>(&geom, t, None, &mask, &opts, &mut ctx, &c)?,
        };
        let (gq, gk, gv, gb) = grads;
        let arr = |g: Vec<E>, like: &Array| Array::new(g, like.shape().to_vec());
        let bias = match (gb, args.bias) {
            (Some(g), Some(b)) => Some(Array::from_f64(b.dtype(), &g, b.shape().to_vec())?),
            _ => None,
        };
        return Ok(Computed::Grads(AttentionGrads {
            query: arr(gq, query)?,
            key: arr(gk, key)?,
            value: Some(arr(gv, value)?),
            bias,
        }));
    }
    let out_len = num_elements("output", query.shape())?;
    let mut out = try_filled("output", out_len, E::default())?;
    let mut residual = if args.return_residual {
        let len = num_elements("residual", &[s.batch, s.q_len, s.heads])?;
        Some(try_filled("residual", len, 0.0f64)?)
    } else {
        None
    };
    match (&bias_f32, &bias_f64, &bias_shape) {
        (Some(b), _, Some(shape)) => kernel::jax_attention(
            &geom,
            &q,
            &k,
            &v,
            Some(&Broadcast::new("bias", b, shape)?),
            &mask,
            &opts,
            &mut ctx,
            &mut out,
            residual.as_deref_mut(),
        )?,
        (_, Some(b), Some(shape)) => kernel::jax_attention(
            &geom,
            &q,
            &k,
            &v,
            Some(&Broadcast::new("bias", b, shape)?),
            &mask,
            &opts,
            &mut ctx,
            &mut out,
            residual.as_deref_mut(),
        )?,
        _ => kernel::jax_attention::<E, f32, _, _, _, _>(
            &geom,
            &q,
            &k,
            &v,
            None,
            &mask,
            &opts,
            &mut ctx,
            &mut out,
            residual.as_deref_mut(),
        )?,
    }
    let output = Array::new(out, query.shape().to_vec())?;
    let residual = residual
        .map(|r| {
            let shape = query.shape()[..query.ndim() - 1].to_vec();
            // jax forms the residual in float32, then casts it to the input dtype.
            let r = try_collect(
                "residual",
                r.len(),
                r.iter().map(|&x| E::from_f32(x as f32)),
            )?;
            Array::new(r, shape)
        })
        .transpose()?;
    Ok(Computed::Forward(JaxOutput { output, residual }))
}

/// Query, key and value of a call in the input dtype.
struct Tensors<'t, E> {
    q: &'t [E],
    k: &'t [E],
    v: &'t [E],
}

/// The gradients of query, key, value (input dtype) and bias (as f64 values).
type Vjp<E> = (Vec<E>, Vec<E>, Vec<E>, Option<Vec<f64>>);

fn vjp<E: Element, B: Element>(
    geom: &Geometry<'_, usize, usize, usize, usize>,
    t: Tensors<'_, E>,
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &JaxOptions,
    ctx: &mut Context<'_>,
    cotangent: &[E],
) -> Result<Vjp<E>, AttnError> {
    let mut gq = try_filled("grad query", t.q.len(), E::default())?;
    let mut gk = try_filled("grad key", t.k.len(), E::default())?;
    let mut gv = try_filled("grad value", t.v.len(), E::default())?;
    let mut gb = bias
        .map(|b| try_filled("grad bias", b.data().len(), B::default()))
        .transpose()?;
    let grads = Grads {
        query: &mut gq,
        key: &mut gk,
        value: &mut gv,
        bias: gb.as_deref_mut(),
    };
    kernel::jax_attention_backward(geom, t.q, t.k, t.v, bias, mask, opts, ctx, cotangent, grads)?;
    let gb = gb.map(|g| g.iter().map(|x| x.to_f64()).collect());
    Ok((gq, gk, gv, gb))
}

/// What [`run`] computes.
enum Computed {
    Forward(JaxOutput),
    Grads(AttentionGrads),
}
