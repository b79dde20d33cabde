//! Casting and NumPy broadcasting of dynamically shaped arrays (used where Flax's semantics
//! need a materialized copy: dtype casts, enlarged results, mask utilities).

use std::borrow::Cow;

use crate::array::{Array, try_collect};
use crate::element::Element;
use crate::error::{AttnError, num_elements};

/// `a` converted to `E` (borrowed when it already is), the copy fallibly allocated: an
/// [`AttnError::Allocation`] naming `tensor` instead of an abort.
pub(crate) fn cast<'x, E: Element>(
    tensor: &'static str,
    a: &'x Array,
) -> Result<Cow<'x, [E]>, AttnError> {
    Ok(match a.as_slice::<E>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(try_collect(
            tensor,
            a.len(),
            (0..a.len()).map(|i| E::from_f64(a.f64_at(i))),
        )?),
    })
}

/// The element offsets into an operand of `shape` of each element of `target` (row-major),
/// NumPy broadcasting: an iterator, so that walking a broadcast allocates nothing of its size.
pub(crate) struct Offsets {
    target: Vec<usize>,
    strides: Vec<usize>,
    index: Vec<usize>,
    offset: usize,
    left: usize,
}

impl Offsets {
    /// The offsets of `shape` broadcast to `target`, or an error naming `tensor` and the axis.
    pub(crate) fn new(
        tensor: &'static str,
        shape: &[usize],
        target: &[usize],
    ) -> Result<Self, AttnError> {
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
        Ok(Offsets {
            target: target.to_vec(),
            strides,
            index: vec![0; target.len()],
            offset: 0,
            left: num_elements(tensor, target)?,
        })
    }

    /// The number of elements of the target.
    pub(crate) fn len(&self) -> usize {
        self.left
    }
}

impl Iterator for Offsets {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let current = self.offset;
        if self.left > 0 {
            for a in (0..self.target.len()).rev() {
                self.index[a] += 1;
                self.offset += self.strides[a];
                if self.index[a] < self.target[a] {
                    break;
                }
                self.offset -= self.strides[a] * self.index[a];
                self.index[a] = 0;
            }
        }
        Some(current)
    }
}

/// `data` of `shape` broadcast (copied) to `target`, fallibly allocated.
pub(crate) fn broadcast_to<T: Copy>(
    tensor: &'static str,
    data: &[T],
    shape: &[usize],
    target: &[usize],
) -> Result<Vec<T>, AttnError> {
    let offsets = Offsets::new(tensor, shape, target)?;
    try_collect(tensor, offsets.len(), offsets.map(|i| data[i]))
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
