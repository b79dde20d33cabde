//! Typed tensors: [`Tensor`] owns row-major data, [`TensorView`] / [`TensorViewMut`] borrow it
//! from any slice. The shape type says which dims are static ([`Const`](crate::Const)) and which
//! are known at run time (`usize`).

use crate::dim::Shape;
use crate::element::Scalar;
use crate::error::{AttnError, num_elements, try_filled};

/// Checks that a slice of `len` elements holds exactly the elements of `shape`.
fn check_len<S: Shape>(tensor: &'static str, shape: &S, len: usize) -> Result<(), AttnError> {
    let dims = shape.dims();
    let expected = num_elements(tensor, &dims)?;
    if expected != len {
        return Err(AttnError::Length {
            tensor,
            shape: dims,
            expected,
            found: len,
        });
    }
    Ok(())
}

/// An owned, row-major tensor of element type `E` and shape type `S`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<E, S: Shape> {
    data: Vec<E>,
    shape: S,
}

impl<E: Scalar, S: Shape> Tensor<E, S> {
    /// Wraps row-major `data`; its length must equal the shape's number of elements.
    pub fn from_vec(data: Vec<E>, shape: S) -> Result<Self, AttnError> {
        check_len("tensor", &shape, data.len())?;
        Ok(Tensor { data, shape })
    }

    /// A tensor of zeros (`E::default()`).
    pub fn zeros(shape: S) -> Result<Self, AttnError> {
        let len = num_elements("tensor", &shape.dims())?;
        Ok(Tensor {
            data: try_filled("tensor", len, E::default())?,
            shape,
        })
    }

    /// The shape.
    pub fn shape(&self) -> S {
        self.shape
    }

    /// The elements, row-major.
    pub fn as_slice(&self) -> &[E] {
        &self.data
    }

    /// The elements, row-major, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [E] {
        &mut self.data
    }

    /// The elements, row-major.
    pub fn into_vec(self) -> Vec<E> {
        self.data
    }

    /// A borrowed view.
    pub fn view(&self) -> TensorView<'_, E, S> {
        TensorView {
            data: &self.data,
            shape: self.shape,
        }
    }

    /// A mutable borrowed view.
    pub fn view_mut(&mut self) -> TensorViewMut<'_, E, S> {
        TensorViewMut {
            data: &mut self.data,
            shape: self.shape,
        }
    }
}

/// A row-major tensor borrowed from a slice (a `Vec`, an `ndarray` array, a memory map, ...).
///
/// `Copy`, like the shared borrow it holds: the same view can be passed as query, key and value.
#[derive(Debug)]
pub struct TensorView<'a, E, S: Shape> {
    data: &'a [E],
    shape: S,
}

impl<E, S: Shape> Clone for TensorView<'_, E, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E, S: Shape> Copy for TensorView<'_, E, S> {}

impl<'a, E: Scalar, S: Shape> TensorView<'a, E, S> {
    /// Views `data` with `shape`; the slice must hold exactly the shape's number of elements.
    pub fn new(data: &'a [E], shape: S) -> Result<Self, AttnError> {
        check_len("tensor view", &shape, data.len())?;
        Ok(TensorView { data, shape })
    }

    /// The shape.
    pub fn shape(&self) -> S {
        self.shape
    }

    /// The elements, row-major.
    pub fn as_slice(&self) -> &'a [E] {
        self.data
    }
}

impl<'a, E: Scalar, S: Shape> From<&'a Tensor<E, S>> for TensorView<'a, E, S> {
    fn from(t: &'a Tensor<E, S>) -> Self {
        t.view()
    }
}

/// A row-major tensor mutably borrowed from a slice.
#[derive(Debug)]
pub struct TensorViewMut<'a, E, S: Shape> {
    data: &'a mut [E],
    shape: S,
}

impl<'a, E: Scalar, S: Shape> TensorViewMut<'a, E, S> {
    /// Views `data` with `shape`; the slice must hold exactly the shape's number of elements.
    pub fn new(data: &'a mut [E], shape: S) -> Result<Self, AttnError> {
        check_len("tensor view", &shape, data.len())?;
        Ok(TensorViewMut { data, shape })
    }

    /// The shape.
    pub fn shape(&self) -> S {
        self.shape
    }

    /// The elements, row-major.
    pub fn as_slice(&self) -> &[E] {
        self.data
    }

    /// The elements, row-major, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [E] {
        self.data
    }

    /// Gives up the view, returning the borrowed slice.
    pub fn into_slice(self) -> &'a mut [E] {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::Const;

    #[test]
    fn lengths_are_checked() {
        assert!(Tensor::from_vec(vec![0.0f32; 6], (2usize, Const::<3>)).is_ok());
        let err = Tensor::from_vec(vec![0.0f32; 5], (2usize, Const::<3>)).unwrap_err();
        assert!(err.to_string().contains("needs 6 elements"), "{err}");
        let data = [0.0f64; 4];
        assert!(TensorView::new(&data, (usize::MAX, 2usize)).is_err());
        let z = Tensor::<f32, _>::zeros((Const::<2>, 2usize)).unwrap();
        assert_eq!(z.as_slice(), &[0.0; 4]);
    }
}

/// The gradients that the `backward` and `weights_backward` methods of an `attention!` layer
/// return: one [`Tensor`] per differentiable input, each of its input's shape type and the
/// layer's element type, so the method's signature spells the shape of every gradient.
/// `V` is `()` for `weights_backward` (the weights do not depend on a value), `Bias` is `()`
/// for a layer without a bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<Q, K, V = (), Bias = ()> {
    /// The gradient of `query`.
    pub query: Q,
    /// The gradient of `key` (with grouped-query attention, summed over each group's query
    /// heads).
    pub key: K,
    /// The gradient of `value`.
    pub value: V,
    /// The gradient of `bias`, in the bias's declared shape (summed over the axes along which
    /// it broadcasts).
    pub bias: Bias,
}
