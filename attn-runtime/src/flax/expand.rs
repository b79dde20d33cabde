//! Casting and NumPy broadcasting of dynamically shaped arrays (used where Flax's semantics
//! need a materialized copy: dtype casts, enlarged results, mask utilities).

use std::borrow::Cow;

use crate::array::Array;
use crate::element::Element;
use crate::error::{AttnError, num_elements, try_filled};

/// The elements of `a` as `E`: borrowed when `a` already holds `E`, else converted as
/// `jnp.asarray(a, E)` (round to nearest; bool gives 0/1).
pub(crate) fn cast<E: Element>(a: &Array) -> Cow<'_, [E]> {
    match a.as_slice::<E>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.to_f64_vec().into_iter().map(E::from_f64).collect()),
    }
}

/// For every element of `target` (row-major), the flat index of the element of `shape` it
/// reads under NumPy broadcasting. `shape` must broadcast to `target` (checked by the caller;
/// a violation gives an error, never a panic).
pub(crate) fn broadcast_indices(
    tensor: &'static str,
    shape: &[usize],
    target: &[usize],
) -> Result<Vec<usize>, AttnError> {
    let bad = |axis: usize| AttnError::Broadcast {
        tensor,
        shape: shape.to_vec(),
        target: target.to_vec(),
        axis,
    };
    if shape.len() > target.len() {
        return Err(bad(0));
    }
    let lead = target.len() - shape.len();
    let mut strides = vec![0usize; target.len()];
    let mut stride = 1usize;
    for (a, &n) in shape.iter().enumerate().rev() {
        if n != 1 && n != target[lead + a] {
            return Err(bad(a));
        }
        if n != 1 {
            strides[lead + a] = stride;
        }
        stride = stride.saturating_mul(n);
    }
    let total = num_elements(tensor, target)?;
    let mut out = try_filled(tensor, total, 0usize)?;
    let mut index = vec![0usize; target.len()];
    let mut offset = 0usize;
    for slot in out.iter_mut() {
        *slot = offset;
        for a in (0..target.len()).rev() {
            index[a] += 1;
            offset += strides[a];
            if index[a] < target[a] {
                break;
            }
            offset -= strides[a] * index[a];
            index[a] = 0;
        }
    }
    Ok(out)
}

/// `jnp.broadcast_to(data, target)` for row-major `data` of `shape`.
pub(crate) fn broadcast_to<T: Copy>(
    tensor: &'static str,
    data: &[T],
    shape: &[usize],
    target: &[usize],
) -> Result<Vec<T>, AttnError> {
    Ok(broadcast_indices(tensor, shape, target)?
        .into_iter()
        .map(|i| data[i])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_copies() {
        let d = [1, 2, 3];
        assert_eq!(
            broadcast_to("x", &d, &[3], &[2, 3]).unwrap(),
            vec![1, 2, 3, 1, 2, 3]
        );
        assert_eq!(
            broadcast_to("x", &d, &[3, 1], &[3, 2]).unwrap(),
            vec![1, 1, 2, 2, 3, 3]
        );
        assert!(broadcast_to("x", &d, &[3], &[2, 2]).is_err());
        assert_eq!(
            broadcast_to("x", &d[..0], &[0], &[2, 0]).unwrap(),
            Vec::<i32>::new()
        );
    }
}
