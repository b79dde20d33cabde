//! The one error type of attn: every message names the tensor, the axis, what was expected and
//! what was found.

use core::fmt;

use crate::element::DType;

/// What went wrong in a call to attn. Every variant names the offending tensor.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AttnError {
    /// Two inputs that share a named dimension of an `attention!` declaration disagree at run
    /// time (constructed by generated code).
    DimMismatch {
        /// The dimension's name in the declaration (e.g. `"T"`).
        dim: &'static str,
        /// The first input that has the dimension.
        first: &'static str,
        /// Its size there.
        first_size: usize,
        /// The second input.
        second: &'static str,
        /// Its size there.
        second_size: usize,
    },
    /// A tensor has the wrong number of dimensions.
    Rank {
        /// The tensor.
        tensor: &'static str,
        /// What rank was expected (e.g. `"at least 3: [batch..., q_len, heads, depth]"`).
        expected: String,
        /// The shape that was found.
        found: Vec<usize>,
    },
    /// One axis of a tensor has the wrong size.
    Axis {
        /// The tensor.
        tensor: &'static str,
        /// The axis (e.g. `"heads (axis -2)"`).
        axis: String,
        /// What was expected (e.g. `"4, as in query"`).
        expected: String,
        /// The size that was found.
        found: usize,
    },
    /// A slice does not hold exactly the number of elements of its shape.
    Length {
        /// The tensor.
        tensor: &'static str,
        /// The shape.
        shape: Vec<usize>,
        /// The number of elements the shape needs.
        expected: usize,
        /// The slice's length.
        found: usize,
    },
    /// The product of a shape's sizes overflows `usize`.
    Overflow {
        /// The tensor.
        tensor: &'static str,
        /// The shape.
        shape: Vec<usize>,
    },
    /// A bias or mask does not broadcast (NumPy rules) to the shape of the logits.
    Broadcast {
        /// The tensor (`"bias"` or `"mask"`).
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// The shape it must broadcast to.
        target: Vec<usize>,
        /// The axis of the tensor (counted from the front) that does not fit.
        axis: usize,
    },
    /// A tensor has the wrong dtype.
    DType {
        /// The tensor.
        tensor: &'static str,
        /// The dtype Flax would use here.
        expected: DType,
        /// The dtype found.
        found: DType,
    },
    /// The dropout rate is below 0, above 1 or NaN.
    DropoutRate {
        /// The rate.
        rate: f64,
    },
    /// Dropout is active (`deterministic == false`, rate > 0) but no dropout RNG was given.
    MissingDropoutRng {
        /// The rate.
        rate: f64,
    },
    /// Masks passed to `combine_masks` have different ranks.
    MaskRanks {
        /// The shapes of the masks (the `None`s removed).
        shapes: Vec<Vec<usize>>,
    },
    /// An argument value is not allowed (message says which and why).
    InvalidArgument {
        /// The argument.
        argument: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A buffer could not be allocated.
    Allocation {
        /// What the buffer was for.
        tensor: &'static str,
        /// The number of elements requested.
        elements: usize,
    },
    /// A parameter of a checkpoint is missing, has the wrong shape or dtype, is unexpected, or
    /// the file is truncated or corrupt (`path` then names the file-level entry).
    Checkpoint {
        /// The parameter's path in the tree (e.g. `"params/query/kernel"`).
        path: String,
        /// What the layer expects there.
        expected: String,
        /// What the checkpoint holds.
        found: String,
    },
    /// A KV cache has no room for the tokens of a call (the cache is left unchanged).
    CacheCapacity {
        /// The cache's capacity in tokens.
        capacity: usize,
        /// The tokens it already holds.
        filled: usize,
        /// The tokens the call would add.
        requested: usize,
    },
}

fn shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl fmt::Display for AttnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttnError::DimMismatch {
                dim,
                first,
                first_size,
                second,
                second_size,
            } => write!(
                f,
                "dimension `{dim}`: `{first}` has {first_size} but `{second}` has {second_size}"
            ),
            AttnError::Rank {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "`{tensor}` must have rank {expected}, but has shape {} (rank {})",
                shape(found),
                found.len()
            ),
            AttnError::Axis {
                tensor,
                axis,
                expected,
                found,
            } => write!(
                f,
                "`{tensor}` axis {axis}: expected {expected}, found {found}"
            ),
            AttnError::Length {
                tensor,
                shape: s,
                expected,
                found,
            } => write!(
                f,
                "`{tensor}` of shape {} needs {expected} elements, but the slice has {found}",
                shape(s)
            ),
            AttnError::Overflow { tensor, shape: s } => write!(
                f,
                "`{tensor}` shape {}: the number of elements overflows usize",
                shape(s)
            ),
            AttnError::Broadcast {
                tensor,
                shape: s,
                target,
                axis,
            } => {
                // `get`: the fields are public, so Display must not index out of bounds.
                let sizes = target
                    .len()
                    .checked_sub(s.len())
                    .and_then(|offset| Some((s.get(*axis)?, target.get(axis + offset)?)));
                match sizes {
                    Some((n, t)) => write!(
                        f,
                        "`{tensor}` of shape {} does not broadcast to {}: axis {axis} has size {n}, expected 1 or {t}",
                        shape(s),
                        shape(target),
                    ),
                    None if s.len() > target.len() => write!(
                        f,
                        "`{tensor}` of shape {} does not broadcast to {}: rank {} is higher than {}",
                        shape(s),
                        shape(target),
                        s.len(),
                        target.len()
                    ),
                    None => write!(
                        f,
                        "`{tensor}` of shape {} does not broadcast to {}",
                        shape(s),
                        shape(target)
                    ),
                }
            }
            AttnError::DType {
                tensor,
                expected,
                found,
            } => write!(f, "`{tensor}` must have dtype {expected}, found {found}"),
            AttnError::DropoutRate { rate } => {
                write!(f, "`dropout_rate` must be in [0, 1], found {rate}")
            }
            AttnError::MissingDropoutRng { rate } => write!(
                f,
                "`dropout_rng` is required: dropout is active (deterministic = false, dropout_rate = {rate}); \
                 pass a dropout RNG, or set deterministic = true"
            ),
            AttnError::MaskRanks { shapes } => {
                let s: Vec<String> = shapes.iter().map(|x| shape(x)).collect();
                write!(
                    f,
                    "`combine_masks`: masks must have the same rank, found shapes {}",
                    s.join(", ")
                )
            }
            AttnError::InvalidArgument { argument, reason } => {
                write!(f, "`{argument}`: {reason}")
            }
            AttnError::Allocation { tensor, elements } => {
                write!(f, "cannot allocate {elements} elements for `{tensor}`")
            }
            AttnError::Checkpoint {
                path,
                expected,
                found,
            } => write!(f, "checkpoint `{path}`: expected {expected}, found {found}"),
            AttnError::CacheCapacity {
                capacity,
                filled,
                requested,
            } => write!(
                f,
                "KV cache full: capacity {capacity}, holds {filled}, {requested} more requested \
                 (the cache is unchanged)"
            ),
        }
    }
}

impl std::error::Error for AttnError {}

/// Allocates a vector of `len` copies of `value`, returning an error instead of aborting when
/// the memory is not available.
pub(crate) fn try_filled<T: Clone>(
    tensor: &'static str,
    len: usize,
    value: T,
) -> Result<Vec<T>, AttnError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| AttnError::Allocation {
            tensor,
            elements: len,
        })?;
    v.resize(len, value);
    Ok(v)
}

/// Checked product of a shape, naming the tensor on overflow.
pub(crate) fn num_elements(tensor: &'static str, dims: &[usize]) -> Result<usize, AttnError> {
    crate::dim::checked_product(dims).ok_or_else(|| AttnError::Overflow {
        tensor,
        shape: dims.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_tensor_axis_expected_found() {
        let e = AttnError::DimMismatch {
            dim: "T",
            first: "query",
            first_size: 7,
            second: "key",
            second_size: 9,
        };
        assert_eq!(
            e.to_string(),
            "dimension `T`: `query` has 7 but `key` has 9"
        );
        let e = AttnError::Broadcast {
            tensor: "bias",
            shape: vec![3, 5],
            target: vec![2, 4, 5],
            axis: 0,
        };
        assert_eq!(
            e.to_string(),
            "`bias` of shape [3, 5] does not broadcast to [2, 4, 5]: axis 0 has size 3, expected 1 or 4"
        );
    }

    // Regression: Display indexed `shape[axis]` and `target[..]` directly, so a hand-built
    // (public fields) inconsistent error panicked when printed.
    #[test]
    fn display_of_inconsistent_broadcast_does_not_panic() {
        let e = AttnError::Broadcast {
            tensor: "bias",
            shape: vec![3],
            target: vec![2, 4],
            axis: 7,
        };
        assert_eq!(
            e.to_string(),
            "`bias` of shape [3] does not broadcast to [2, 4]"
        );
        let e = AttnError::Broadcast {
            tensor: "mask",
            shape: vec![1, 2, 3],
            target: vec![3],
            axis: 0,
        };
        assert_eq!(
            e.to_string(),
            "`mask` of shape [1, 2, 3] does not broadcast to [3]: rank 3 is higher than 1"
        );
    }
}
