//! [`ArrayRef`]: a borrowed, dtype-tagged float tensor, the input type of the layer. Built from
//! an [`Array`], from a slice and a shape, or (feature `ndarray`) from an `ndarray` view, without
//! copying contiguous row-major data.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::array::{Array, ArrayData};
use crate::element::{DType, Element};
use crate::error::{AttnError, num_elements};

/// The elements of an [`ArrayRef`], borrowed when they could be.
#[derive(Clone, Debug)]
pub enum Floats<'a> {
    /// `float32`
    F32(Cow<'a, [f32]>),
    /// `float64`
    F64(Cow<'a, [f64]>),
    /// `bfloat16`
    BF16(Cow<'a, [bf16]>),
    /// `float16`
    F16(Cow<'a, [f16]>),
}

impl Floats<'_> {
    /// The dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Floats::F32(_) => DType::F32,
            Floats::F64(_) => DType::F64,
            Floats::BF16(_) => DType::BF16,
            Floats::F16(_) => DType::F16,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Floats::F32(v) => v.len(),
            Floats::F64(v) => v.len(),
            Floats::BF16(v) => v.len(),
            Floats::F16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as `f64` (exact).
    #[inline]
    pub(crate) fn get(&self, i: usize) -> f64 {
        match self {
            Floats::F32(v) => v[i] as f64,
            Floats::F64(v) => v[i],
            Floats::BF16(v) => v[i].to_f64(),
            Floats::F16(v) => v[i].to_f64(),
        }
    }
}

/// A float element type the layer accepts (`f32`, `f64`, `bf16`, `f16`). Sealed.
pub trait LayerElement: Element + sealed::Sealed {
    /// Wraps a slice as [`Floats`].
    fn floats(data: Cow<'_, [Self]>) -> Floats<'_>;
    /// Takes the vector out of array data of this dtype.
    fn take(data: ArrayData) -> Option<Vec<Self>>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

macro_rules! layer_element {
    ($t:ty, $v:ident) => {
        impl LayerElement for $t {
            fn floats(data: Cow<'_, [Self]>) -> Floats<'_> {
                Floats::$v(data)
            }
            fn take(data: ArrayData) -> Option<Vec<Self>> {
                match data {
                    ArrayData::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
layer_element!(f32, F32);
layer_element!(f64, F64);
layer_element!(bf16, BF16);
layer_element!(f16, F16);

/// A borrowed float tensor: row-major elements and a shape.
#[derive(Clone, Debug)]
pub struct ArrayRef<'a> {
    data: Floats<'a>,
    shape: Cow<'a, [usize]>,
}

impl<'a> ArrayRef<'a> {
    /// Borrows row-major `data` of `shape`; the lengths must agree.
    pub fn new<T: LayerElement>(data: &'a [T], shape: &'a [usize]) -> Result<Self, AttnError> {
        Self::from_parts(
            "inputs",
            T::floats(Cow::Borrowed(data)),
            Cow::Borrowed(shape),
        )
    }

    /// Borrows row-major `data` with an owned `shape`; the lengths must agree.
    pub fn from_slice<T: LayerElement>(
        data: &'a [T],
        shape: Vec<usize>,
    ) -> Result<Self, AttnError> {
        Self::from_parts("inputs", T::floats(Cow::Borrowed(data)), Cow::Owned(shape))
    }

    /// Borrows an [`Array`]; `tensor` names it in errors (it must hold a float dtype).
    pub fn from_array(tensor: &'static str, array: &'a Array) -> Result<Self, AttnError> {
        let data = match array.data() {
            ArrayData::F32(v) => Floats::F32(Cow::Borrowed(v)),
            ArrayData::F64(v) => Floats::F64(Cow::Borrowed(v)),
            ArrayData::BF16(v) => Floats::BF16(Cow::Borrowed(v)),
            ArrayData::F16(v) => Floats::F16(Cow::Borrowed(v)),
            _ => {
                return Err(AttnError::InvalidArgument {
                    argument: tensor,
                    reason: format!("must have a float dtype, found {}", array.dtype()),
                });
            }
        };
        Self::from_parts(tensor, data, Cow::Borrowed(array.shape()))
    }

    pub(crate) fn from_parts(
        tensor: &'static str,
        data: Floats<'a>,
        shape: Cow<'a, [usize]>,
    ) -> Result<Self, AttnError> {
        let expected = num_elements(tensor, &shape)?;
        if expected != data.len() {
            return Err(AttnError::Length {
                tensor,
                shape: shape.into_owned(),
                expected,
                found: data.len(),
            });
        }
        Ok(ArrayRef { data, shape })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The elements.
    pub fn data(&self) -> &Floats<'a> {
        &self.data
    }
}

#[cfg(feature = "ndarray")]
mod nd {
    use super::*;
    use ndarray::{ArrayD, ArrayView, Dimension, IxDyn};

    impl<'a, T: LayerElement, D: Dimension> From<ArrayView<'a, T, D>> for ArrayRef<'a> {
        /// Borrows a standard-layout (row-major contiguous) view; other layouts are copied into
        /// row-major order.
        fn from(view: ArrayView<'a, T, D>) -> Self {
            let shape = Cow::Owned(view.shape().to_vec());
            let data = match view.to_slice() {
                Some(s) => Cow::Borrowed(s),
                None => Cow::Owned(view.iter().copied().collect()),
            };
            ArrayRef {
                data: T::floats(data),
                shape,
            }
        }
    }

    /// Moves an [`Array`] into an `ndarray::ArrayD` of element `T` without copying; an error
    /// names `T` and the array's dtype if they differ.
    pub fn into_ndarray<T: LayerElement>(array: Array) -> Result<ArrayD<T>, AttnError> {
        let dtype = array.dtype();
        let (data, shape) = array.into_parts();
        let v = T::take(data).ok_or(AttnError::DType {
            tensor: "output",
            expected: T::DTYPE,
            found: dtype,
        })?;
        ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| AttnError::InvalidArgument {
            argument: "output",
            reason: e.to_string(),
        })
    }
}

#[cfg(feature = "ndarray")]
pub use nd::into_ndarray;
