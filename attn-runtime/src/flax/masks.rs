//! Flax's mask utilities: `make_attention_mask`, `make_causal_mask`, `combine_masks`.

use super::expand::broadcast_indices;
use crate::array::{Array, ArrayData};
use crate::element::DType;
use crate::error::AttnError;
use crate::kernel::broadcast_shapes;

/// The pairwise function of `make_attention_mask` (the `jnp` functions Flax code passes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PairwiseFn {
    /// `jnp.multiply` (Flax's default): the product in the promoted dtype (products of token
    /// ids, not 0/1, for raw int inputs; logical and for bools).
    #[default]
    Multiply,
    /// `jnp.greater_equal`
    GreaterEqual,
    /// `jnp.greater`
    Greater,
    /// `jnp.less_equal`
    LessEqual,
    /// `jnp.less`
    Less,
    /// `jnp.equal`
    Equal,
    /// `jnp.not_equal`
    NotEqual,
    /// `jnp.logical_and` (nonzero is true)
    LogicalAnd,
}

impl PairwiseFn {
    /// Parses the `jnp` function name (`"multiply"`, `"greater_equal"`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "multiply" => PairwiseFn::Multiply,
            "greater_equal" => PairwiseFn::GreaterEqual,
            "greater" => PairwiseFn::Greater,
            "less_equal" => PairwiseFn::LessEqual,
            "less" => PairwiseFn::Less,
            "equal" => PairwiseFn::Equal,
            "not_equal" => PairwiseFn::NotEqual,
            "logical_and" => PairwiseFn::LogicalAnd,
            _ => return None,
        })
    }
}

/// Flax's `make_attention_mask(query_input, key_input, pairwise_fn, extra_batch_dims, dtype)`:
/// `pairwise_fn(query_input[..., :, None], key_input[..., None, :])` with a heads axis of size
/// 1 inserted at -3 and `extra_batch_dims` leading axes of size 1, cast to `dtype`.
/// `[B..., q]`, `[B..., kv]` -> `[1]*extra + [B..., 1, q, kv]` (the batch dims broadcast).
pub fn make_attention_mask(
    query_input: &Array,
    key_input: &Array,
    pairwise_fn: PairwiseFn,
    extra_batch_dims: usize,
    dtype: DType,
) -> Result<Array, AttnError> {
    for (name, a) in [("query_input", query_input), ("key_input", key_input)] {
        if a.ndim() == 0 {
            return Err(AttnError::Rank {
                tensor: name,
                expected: "at least 1: [batch..., length]".into(),
                found: vec![],
            });
        }
    }
    let mut qs = query_input.shape().to_vec();
    qs.push(1);
    let mut ks = key_input.shape().to_vec();
    ks.insert(ks.len() - 1, 1);
    let target = broadcast_shapes(&[&qs, &ks]).map_err(|_| AttnError::Broadcast {
        tensor: "key_input",
        shape: key_input.shape().to_vec(),
        target: query_input.shape().to_vec(),
        axis: 0,
    })?;
    let qi = broadcast_indices("query_input", &qs, &target)?;
    let ki = broadcast_indices("key_input", &ks, &target)?;
    let promoted = query_input.dtype().promote(key_input.dtype());
    let (qv, kv) = (query_input.to_f64_vec(), key_input.to_f64_vec());
    let pairs = qi.iter().zip(&ki).map(|(&a, &b)| (qv[a], kv[b]));
    let data = match pairwise_fn {
        PairwiseFn::Multiply => match promoted {
            DType::Bool => ArrayData::Bool(pairs.map(|(a, b)| a != 0.0 && b != 0.0).collect()),
            // int32 arithmetic wraps, as in JAX.
            DType::I32 => ArrayData::I32(
                pairs
                    .map(|(a, b)| (a as i32).wrapping_mul(b as i32))
                    .collect(),
            ),
            // The product of two values of a float dtype, rounded once to it.
            float => {
                let products: Vec<f64> = pairs.map(|(a, b)| a * b).collect();
                Array::from_f64(float, &products, target.clone())?
                    .into_parts()
                    .0
            }
        },
        cmp => ArrayData::Bool(
            pairs
                .map(|(a, b)| match cmp {
                    PairwiseFn::GreaterEqual => a >= b,
                    PairwiseFn::Greater => a > b,
                    PairwiseFn::LessEqual => a <= b,
                    PairwiseFn::Less => a < b,
                    PairwiseFn::Equal => a == b,
                    PairwiseFn::NotEqual => a != b,
                    _ => a != 0.0 && b != 0.0,
                })
                .collect(),
        ),
    };
    let mut shape = vec![1; extra_batch_dims];
    shape.extend_from_slice(&target[..target.len() - 2]);
    shape.extend_from_slice(&[1, target[target.len() - 2], target[target.len() - 1]]);
    Ok(Array::from_data(data, shape)?.astype(dtype))
}

/// Flax's `make_causal_mask(x, extra_batch_dims, dtype)` for an `x` of shape `x_shape`
/// (only the shape matters): entry `[.., i, j] = (i >= j)`, shape
/// `[1]*extra + x_shape[..-1] + [1, L, L]`.
pub fn make_causal_mask(
    x_shape: &[usize],
    extra_batch_dims: usize,
    dtype: DType,
) -> Result<Array, AttnError> {
    let Some(&len) = x_shape.last() else {
        return Err(AttnError::Rank {
            tensor: "x",
            expected: "at least 1: [batch..., length]".into(),
            found: vec![],
        });
    };
    if i32::try_from(len).is_err() {
        return Err(AttnError::Axis {
            tensor: "x",
            axis: "length (axis -1)".into(),
            expected: "at most i32::MAX (positions are int32)".into(),
            found: len,
        });
    }
    let count = crate::error::num_elements("x", x_shape)?;
    let idxs: Vec<i32> = (0..count).map(|n| (n % len) as i32).collect();
    let x = Array::new(idxs, x_shape.to_vec())?;
    make_attention_mask(&x, &x, PairwiseFn::GreaterEqual, extra_batch_dims, dtype)
}

/// Flax's `combine_masks(*masks, dtype)`: drops the `None`s, returns `None` if nothing is left,
/// else the logical and (nonzero is true) of the masks broadcast together, cast to `dtype`.
/// All masks must have the same rank (Flax asserts it).
pub fn combine_masks(masks: &[Option<&Array>], dtype: DType) -> Result<Option<Array>, AttnError> {
    let present: Vec<&Array> = masks.iter().flatten().copied().collect();
    let Some(first) = present.first() else {
        return Ok(None);
    };
    if present.iter().any(|m| m.ndim() != first.ndim()) {
        return Err(AttnError::MaskRanks {
            shapes: present.iter().map(|m| m.shape().to_vec()).collect(),
        });
    }
    let shapes: Vec<&[usize]> = present.iter().map(|m| m.shape()).collect();
    let target = broadcast_shapes(&shapes).map_err(|k| AttnError::Broadcast {
        tensor: "mask",
        shape: shapes[k].to_vec(),
        target: broadcast_shapes(&shapes[..k]).unwrap_or_default(),
        axis: 0,
    })?;
    let mut acc: Option<Vec<bool>> = None;
    for m in &present {
        let idx = broadcast_indices("mask", m.shape(), &target)?;
        let vals = m.to_bool_vec();
        acc = Some(match acc {
            None => idx.iter().map(|&i| vals[i]).collect(),
            Some(a) => a.iter().zip(&idx).map(|(&x, &i)| x && vals[i]).collect(),
        });
    }
    let combined = Array::new(acc.unwrap_or_default(), target)?;
    Ok(Some(combined.astype(dtype)))
}
