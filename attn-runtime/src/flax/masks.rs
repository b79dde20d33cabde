//! Flax's mask utilities: `make_attention_mask`, `make_causal_mask`, `combine_masks`.

use super::expand::Offsets;
use crate::array::{Array, ArrayData, convert_iter, try_collect};
use crate::element::DType;
use crate::error::{AttnError, num_elements};
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
    let target = broadcast_shapes(&[&qs, &ks]).map_err(|_| {
        // Only the batch axes can disagree (the lengths sit on different axes); name the axis
        // of `key_input` against the batch axes of `query_input` (left-padded with 1s) and the
        // key's own length.
        let (qb, kb) = (&qs[..qs.len() - 2], &ks[..ks.len() - 2]);
        let axis = first_mismatch(qb, kb).unwrap_or(0);
        // Against the query's shape as it is when the ranks allow (the message then shows
        // the caller's shapes), else its batch axes padded to the key's rank.
        let target = if kb.len() <= qb.len() {
            query_input.shape().to_vec()
        } else {
            let mut t = vec![1; kb.len() - qb.len()];
            t.extend_from_slice(qb);
            t.push(ks[ks.len() - 1]);
            t
        };
        AttnError::Broadcast {
            tensor: "key_input",
            shape: key_input.shape().to_vec(),
            target,
            axis,
        }
    })?;
    let total = num_elements("mask", &target)?;
    let qi = Offsets::new("query_input", &qs, &target)?;
    let ki = Offsets::new("key_input", &ks, &target)?;
    let promoted = query_input.dtype().promote(key_input.dtype());
    let pairs = qi
        .zip(ki)
        .map(|(a, b)| (query_input.f64_at(a), key_input.f64_at(b)));
    let data = match pairwise_fn {
        PairwiseFn::Multiply => match promoted {
            DType::Bool => convert_iter(
                DType::Bool,
                "mask",
                total,
                pairs.map(|(a, b)| f64::from(u8::from(a != 0.0 && b != 0.0))),
            )?,
            // int32 arithmetic wraps, as in JAX.
            DType::I32 => ArrayData::I32(try_collect(
                "mask",
                total,
                pairs.map(|(a, b)| (a as i32).wrapping_mul(b as i32)),
            )?),
            // The product of two values of a float dtype, rounded once to it.
            float => convert_iter(float, "mask", total, pairs.map(|(a, b)| a * b))?,
        },
        cmp => ArrayData::Bool(try_collect(
            "mask",
            total,
            pairs.map(|(a, b)| match cmp {
                PairwiseFn::GreaterEqual => a >= b,
                PairwiseFn::Greater => a > b,
                PairwiseFn::LessEqual => a <= b,
                PairwiseFn::Less => a < b,
                PairwiseFn::Equal => a == b,
                PairwiseFn::NotEqual => a != b,
                _ => a != 0.0 && b != 0.0,
            }),
        )?),
    };
    let mut shape = mask_prefix(extra_batch_dims, &target[..target.len() - 2])?;
    shape.extend_from_slice(&[1, target[target.len() - 2], target[target.len() - 1]]);
    Array::from_data(data, shape)?.try_into_dtype(dtype, "mask")
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
    let mut shape = mask_prefix(extra_batch_dims, &x_shape[..x_shape.len() - 1])?;
    shape.extend_from_slice(&[1, len, len]);
    // The shape alone can ask for any size: check it and reserve before building anything;
    // the entries are written in `dtype` directly (one buffer, the result's).
    let total = num_elements("mask", &shape)?;
    // Entry `[.., i, j]` is `i >= j` for every leading index (what `make_attention_mask(idxs,
    // idxs, greater_equal)` gives for `idxs = broadcast_to(arange(len), x_shape)`).
    let entries = (0..total).map(|n| {
        let (i, j) = (n / len % len, n % len);
        f64::from(u8::from(i >= j))
    });
    let data = convert_iter(dtype, "mask", total, entries)?;
    Array::from_data(data, shape)
}

/// `[1] * extra_batch_dims + batch`: the leading axes of a mask. NumPy arrays have at most 64
/// dims, so a larger `extra_batch_dims` is an error (and is never allocated).
fn mask_prefix(extra_batch_dims: usize, batch: &[usize]) -> Result<Vec<usize>, AttnError> {
    const MAX_DIMS: usize = 64;
    let rank = extra_batch_dims
        .saturating_add(batch.len())
        .saturating_add(3);
    if rank > MAX_DIMS {
        return Err(AttnError::InvalidArgument {
            argument: "extra_batch_dims",
            reason: format!(
                "the mask would have {rank} dims; at most {MAX_DIMS} are supported (as in NumPy)"
            ),
        });
    }
    let mut shape = vec![1; extra_batch_dims];
    shape.extend_from_slice(batch);
    Ok(shape)
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
    let target = broadcast_shapes(&shapes).map_err(|k| {
        let before = broadcast_shapes(&shapes[..k]).unwrap_or_default();
        AttnError::Broadcast {
            tensor: "mask",
            shape: shapes[k].to_vec(),
            axis: first_mismatch(&before, shapes[k]).unwrap_or(0),
            target: before,
        }
    })?;
    let total = num_elements("mask", &target)?;
    let mut acc = try_collect("mask", total, std::iter::repeat(true))?;
    for m in &present {
        for (x, i) in acc
            .iter_mut()
            .zip(Offsets::new("mask", m.shape(), &target)?)
        {
            *x = *x && m.bool_at(i);
        }
    }
    Array::new(acc, target)?
        .try_into_dtype(dtype, "mask")
        .map(Some)
}

/// The axis of `shape` (its own numbering) whose size disagrees with `before` under NumPy's
/// right-aligned broadcasting (neither is 1 and they differ), if any.
fn first_mismatch(before: &[usize], shape: &[usize]) -> Option<usize> {
    let lead = before.len().max(shape.len());
    (0..shape.len()).find(|&a| {
        let t = (lead - shape.len() + a)
            .checked_sub(lead - before.len())
            .map_or(1, |i| before[i]);
        shape[a] != 1 && t != 1 && shape[a] != t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_matches_greater_equal_of_positions() {
        let m = make_causal_mask(&[2, 3], 1, DType::F32).unwrap();
        assert_eq!(m.shape(), &[1, 2, 1, 3, 3]);
        let row: Vec<f64> = vec![1., 0., 0., 1., 1., 0., 1., 1., 1.];
        let want: Vec<f64> = row.iter().chain(&row).copied().collect();
        assert_eq!(m.to_f64_vec(), want);
        let empty = make_causal_mask(&[4, 0], 0, DType::Bool).unwrap();
        assert_eq!(empty.shape(), &[4, 1, 0, 0]);
    }

    // Regression: the shape alone used to be allocated with `collect` (an abort, not an error,
    // when too large), and `extra_batch_dims` with `vec![1; n]`.
    #[test]
    fn huge_requests_are_errors_not_aborts() {
        let e = make_causal_mask(&[1 << 40, 1], 0, DType::Bool).unwrap_err();
        assert_eq!(
            e,
            AttnError::Allocation {
                tensor: "mask",
                elements: 1 << 40
            }
        );
        let e = make_causal_mask(&[4], usize::MAX, DType::Bool).unwrap_err();
        assert!(matches!(
            e,
            AttnError::InvalidArgument {
                argument: "extra_batch_dims",
                ..
            }
        ));
        let x = Array::new(vec![1i32; 2], [2]).unwrap();
        let e = make_attention_mask(&x, &x, PairwiseFn::Multiply, 1 << 50, DType::F32).unwrap_err();
        assert!(matches!(
            e,
            AttnError::InvalidArgument {
                argument: "extra_batch_dims",
                ..
            }
        ));
    }
}
