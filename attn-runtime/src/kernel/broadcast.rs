//! Bias and mask operands: NumPy broadcasting to the logits shape `[batch..., heads, q, kv]`.

use crate::error::{AttnError, num_elements};

/// A bias or mask operand with its own shape, broadcast by NumPy rules to
/// `[batch..., heads, q_len, kv_len]` (missing leading dims and size-1 dims repeat).
#[derive(Clone, Debug)]
pub struct Broadcast<'a, T> {
    name: &'static str,
    data: &'a [T],
    shape: Vec<usize>,
}

impl<'a, T> Broadcast<'a, T> {
    /// Wraps `data` (row-major) of `shape`; `name` (e.g. `"bias"`) is used in error messages.
    /// The slice must hold exactly the shape's number of elements.
    pub fn new(name: &'static str, data: &'a [T], shape: &[usize]) -> Result<Self, AttnError> {
        let expected = num_elements(name, shape)?;
        if expected != data.len() {
            return Err(AttnError::Length {
                tensor: name,
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(Broadcast {
            name,
            data,
            shape: shape.to_vec(),
        })
    }

    /// The operand's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The operand's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }
}

/// One row (fixed batch, head, query) of a broadcast operand along the kv axis.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Row<'a, T> {
    /// The operand has the kv axis: one value per key.
    Values(&'a [T]),
    /// The operand's kv axis is 1 or missing: one value for the whole row.
    Splat(T),
}

impl<T: Copy> Row<'_, T> {
    /// The value for key `j`.
    #[inline(always)]
    pub(crate) fn get(&self, j: usize) -> T {
        match self {
            Row::Values(v) => v[j],
            Row::Splat(x) => *x,
        }
    }
}

/// A broadcast operand resolved against a concrete logits shape: the element offsets of each
/// (batch, head, query) row.
#[derive(Clone, Debug)]
pub(crate) struct Resolved<'a, T> {
    data: &'a [T],
    /// The batch dims of the target, and the operand's stride along each (0 where it
    /// broadcasts): the offset of a flattened batch index is computed from them, so that
    /// resolving allocates nothing that scales with the batch (the result may be empty).
    batch_dims: Vec<usize>,
    batch_strides: Vec<usize>,
    head_stride: usize,
    q_stride: usize,
    kv_len: usize,
    /// Whether the operand has the kv axis (stride 1) or broadcasts it (stride 0).
    has_kv: bool,
}

impl<'a, T: Copy> Resolved<'a, T> {
    /// The operand's elements, as given (for the residuals' fingerprint).
    pub(crate) fn elements(&self) -> &'a [T] {
        self.data
    }

    /// Resolves `op` against `[batch_shape..., heads, q_len, kv_len]`.
    pub(crate) fn new(
        op: &Broadcast<'a, T>,
        batch_shape: &[usize],
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Result<Self, AttnError> {
        let mut target = batch_shape.to_vec();
        target.extend_from_slice(&[heads, q_len, kv_len]);
        let shape = &op.shape;
        let err = |axis: usize| AttnError::Broadcast {
            tensor: op.name,
            shape: shape.clone(),
            target: target.clone(),
            axis,
        };
        if shape.len() > target.len() {
            return Err(err(0));
        }
        let lead = target.len() - shape.len();
        // Row-major strides of the operand, 0 where it broadcasts, aligned to the target axes.
        let mut strides = vec![0usize; target.len()];
        let mut stride = 1usize;
        for (a, &n) in shape.iter().enumerate().rev() {
            let t = target[lead + a];
            if n != t && n != 1 {
                return Err(err(a));
            }
            if n != 1 {
                strides[lead + a] = stride;
            }
            // The product of the operand's shape was checked in `new`, but with a dim of 0 it
            // is 0 while a partial product can overflow; such an operand has no element, its
            // strides are never used (the result is empty too), so saturating is enough.
            stride = stride.saturating_mul(n);
        }
        let nb = batch_shape.len();
        Ok(Resolved {
            data: op.data,
            batch_dims: target[..nb].to_vec(),
            batch_strides: strides[..nb].to_vec(),
            head_stride: strides[nb],
            q_stride: strides[nb + 1],
            kv_len,
            has_kv: strides[nb + 2] == 1,
        })
    }

    /// The offset in the operand's data of the row of flattened batch index `b`, head `h`,
    /// query `i`.
    #[inline]
    fn row_start(&self, b: usize, h: usize, i: usize) -> usize {
        // Offset of flattened batch index `b`, last batch axis fastest. Only called for an
        // element of a non-empty result, where every offset is within the operand's data.
        let mut batch_offset = 0;
        let mut rest = b;
        for (&n, &s) in self.batch_dims.iter().zip(&self.batch_strides).rev() {
            batch_offset += rest % n * s;
            rest /= n;
        }
        batch_offset + h * self.head_stride + i * self.q_stride
    }

    /// The operand's own rows along the kv axis (`kv_len` values each, row-major), or `None`
    /// when the operand broadcasts the kv axis (a row is then one value).
    pub(crate) fn own_rows(&self) -> Option<std::slice::ChunksExact<'a, T>> {
        (self.has_kv && self.kv_len > 0).then(|| self.data.chunks_exact(self.kv_len))
    }

    /// The index among [`Self::own_rows`] of the row of flattened batch index `b`, head `h`,
    /// query `i` (only meaningful when `own_rows` is `Some`).
    #[inline]
    pub(crate) fn own_row_index(&self, b: usize, h: usize, i: usize) -> usize {
        self.row_start(b, h, i) / self.kv_len.max(1)
    }

    /// The row of flattened batch index `b`, head `h`, query `i`.
    #[inline]
    pub(crate) fn row(&self, b: usize, h: usize, i: usize) -> Row<'a, T> {
        let start = self.row_start(b, h, i);
        if self.has_kv {
            Row::Values(&self.data[start..start + self.kv_len])
        } else {
            Row::Splat(self.data[start])
        }
    }
}

/// The NumPy broadcast of several shapes, or the index of the first shape that does not fit.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, usize> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for (k, s) in shapes.iter().enumerate() {
        let lead = rank - s.len();
        for (a, &n) in s.iter().enumerate() {
            let o = &mut out[lead + a];
            if *o == 1 {
                *o = n;
            } else if n != 1 && n != *o {
                return Err(k);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_lower_rank_and_unit_dims() {
        // bias [h=2, 1, k=3] against [b=2, h=2, q=4, k=3]
        let data: Vec<i32> = (0..6).collect();
        let op = Broadcast::new("bias", &data, &[2, 1, 3]).unwrap();
        let r = Resolved::new(&op, &[2], 2, 4, 3).unwrap();
        match r.row(1, 1, 3) {
            Row::Values(v) => assert_eq!(v, &[3, 4, 5]),
            Row::Splat(_) => panic!("expected values"),
        }
        let op = Broadcast::new("mask", &data[..2], &[2, 1, 1, 1]).unwrap();
        let r = Resolved::new(&op, &[2], 2, 4, 3).unwrap();
        assert!(matches!(r.row(1, 0, 2), Row::Splat(1)));
    }

    #[test]
    fn rejects_bad_shapes() {
        let data = [0i32; 6];
        let op = Broadcast::new("bias", &data, &[3, 2]).unwrap();
        let e = Resolved::new(&op, &[], 2, 4, 2).unwrap_err();
        assert!(
            e.to_string().contains("axis 0 has size 3, expected 1 or 4"),
            "{e}"
        );
        assert!(Broadcast::new("bias", &data, &[4, 2]).is_err());
        assert_eq!(broadcast_shapes(&[&[2, 1, 3], &[4, 1]]), Ok(vec![2, 4, 3]));
        assert_eq!(broadcast_shapes(&[&[2, 3], &[4, 1]]), Err(1));
    }
}
