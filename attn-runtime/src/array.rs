//! [`Array`]: a dynamically shaped, dtype-tagged tensor, the argument type of the Flax-style
//! API and of [`Sow`](crate::Sow).

use half::{bf16, f16};

use crate::element::{DType, Scalar};
use crate::error::{AttnError, num_elements};

/// The elements of an [`Array`], one vector per dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData {
    /// `float32`
    F32(Vec<f32>),
    /// `float64`
    F64(Vec<f64>),
    /// `bfloat16`
    BF16(Vec<bf16>),
    /// `float16`
    F16(Vec<f16>),
    /// `bool`
    Bool(Vec<bool>),
    /// `int32`
    I32(Vec<i32>),
}

/// A row-major tensor whose dtype and shape are known at run time (like a `jax.Array`).
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    data: ArrayData,
    shape: Vec<usize>,
}

impl Array {
    /// Wraps row-major `data` of any element type; its length must equal the product of `shape`.
    pub fn new<T: Scalar>(data: Vec<T>, shape: impl Into<Vec<usize>>) -> Result<Self, AttnError> {
        Self::from_data(T::into_data(data), shape)
    }

    /// Wraps dtype-tagged data; its length must equal the product of `shape`.
    pub fn from_data(data: ArrayData, shape: impl Into<Vec<usize>>) -> Result<Self, AttnError> {
        let shape = shape.into();
        let expected = num_elements("array", &shape)?;
        let found = data_len(&data);
        if expected != found {
            return Err(AttnError::Length {
                tensor: "array",
                shape,
                expected,
                found,
            });
        }
        Ok(Array { data, shape })
    }

    /// Builds an array of `dtype` from `f64` values, rounding each to the dtype (as
    /// `jnp.asarray(values, dtype)`; bool: nonzero is true; int32: truncation toward zero).
    pub fn from_f64(
        dtype: DType,
        values: &[f64],
        shape: impl Into<Vec<usize>>,
    ) -> Result<Self, AttnError> {
        let data = convert_f64(dtype, values);
        Self::from_data(data, shape)
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        match &self.data {
            ArrayData::F32(_) => DType::F32,
            ArrayData::F64(_) => DType::F64,
            ArrayData::BF16(_) => DType::BF16,
            ArrayData::F16(_) => DType::F16,
            ArrayData::Bool(_) => DType::Bool,
            ArrayData::I32(_) => DType::I32,
        }
    }

    /// The shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        data_len(&self.data)
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype-tagged elements.
    pub fn data(&self) -> &ArrayData {
        &self.data
    }

    /// The dtype-tagged elements, to write in place (the shape stays; the KV cache writes its
    /// slots this way).
    pub(crate) fn data_mut(&mut self) -> &mut ArrayData {
        &mut self.data
    }

    /// The elements as a slice of `T`, or `None` if the array holds another dtype.
    pub fn as_slice<T: Scalar>(&self) -> Option<&[T]> {
        T::slice_of(&self.data)
    }

    /// The elements converted to `f64` (exact for every dtype; bool gives 0 or 1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            ArrayData::F32(v) => v.iter().map(|x| x.to_f64()).collect(),
            ArrayData::F64(v) => v.clone(),
            ArrayData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            ArrayData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            ArrayData::Bool(v) => v.iter().map(|x| x.to_f64()).collect(),
            ArrayData::I32(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// The elements as booleans, nonzero (and NaN) meaning true, as `jnp.where` reads a mask.
    pub fn to_bool_vec(&self) -> Vec<bool> {
        match &self.data {
            ArrayData::Bool(v) => v.clone(),
            _ => self.to_f64_vec().into_iter().map(|x| x != 0.0).collect(),
        }
    }

    /// A copy converted to `dtype` (`x.astype(dtype)`: floats round to nearest, bool is
    /// `x != 0`, int32 truncates toward zero).
    pub fn astype(&self, dtype: DType) -> Array {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match dtype {
            DType::Bool => ArrayData::Bool(self.to_bool_vec()),
            _ => convert_f64(dtype, &self.to_f64_vec()),
        };
        Array {
            data,
            shape: self.shape.clone(),
        }
    }

    /// [`to_f64_vec`](Self::to_f64_vec) with a fallible allocation: an array too big for the
    /// memory left is `AttnError::Allocation`, not an abort. (The infallible conversions
    /// allocate as `Vec::clone` does; attn's own paths use these on callers' arrays.)
    pub fn try_to_f64_vec(&self) -> Result<Vec<f64>, AttnError> {
        let n = self.len();
        try_collect("array", n, (0..n).map(|i| self.f64_at(i)))
    }

    /// [`astype`](Self::astype) with a fallible allocation: an array too big for the memory
    /// left is `AttnError::Allocation`, not an abort.
    pub fn try_astype(&self, dtype: DType) -> Result<Array, AttnError> {
        let n = self.len();
        Ok(Array {
            data: convert_iter(dtype, "array", n, (0..n).map(|i| self.f64_at(i)))?,
            shape: self.shape.clone(),
        })
    }

    /// Element `i` converted to `f64` (exact for every dtype; bool gives 0 or 1).
    pub(crate) fn f64_at(&self, i: usize) -> f64 {
        match &self.data {
            ArrayData::F32(v) => v[i].to_f64(),
            ArrayData::F64(v) => v[i],
            ArrayData::BF16(v) => v[i].to_f64(),
            ArrayData::F16(v) => v[i].to_f64(),
            ArrayData::Bool(v) => v[i].to_f64(),
            ArrayData::I32(v) => v[i].to_f64(),
        }
    }

    /// Element `i` as a boolean, nonzero (and NaN) meaning true.
    pub(crate) fn bool_at(&self, i: usize) -> bool {
        match &self.data {
            ArrayData::Bool(v) => v[i],
            _ => self.f64_at(i) != 0.0,
        }
    }

    /// [`Array::to_bool_vec`] with a fallible allocation (an error naming `tensor`).
    pub(crate) fn try_bool_vec(&self, tensor: &'static str) -> Result<Vec<bool>, AttnError> {
        try_collect(tensor, self.len(), (0..self.len()).map(|i| self.bool_at(i)))
    }

    /// [`Array::astype`] consuming the array, with fallible allocations (an error naming
    /// `tensor`): one buffer of the result's size, no `f64` intermediate.
    pub(crate) fn try_into_dtype(
        self,
        dtype: DType,
        tensor: &'static str,
    ) -> Result<Array, AttnError> {
        if dtype == self.dtype() {
            return Ok(self);
        }
        let data = convert_iter(
            dtype,
            tensor,
            self.len(),
            (0..self.len()).map(|i| self.f64_at(i)),
        )?;
        Ok(Array {
            data,
            shape: self.shape,
        })
    }

    /// Consumes the array, returning its data and shape.
    pub fn into_parts(self) -> (ArrayData, Vec<usize>) {
        (self.data, self.shape)
    }
}

/// Rounds `f64` values to `dtype` (bool: nonzero is true; int32: truncation toward zero).
fn convert_f64(dtype: DType, values: &[f64]) -> ArrayData {
    match dtype {
        DType::F32 => ArrayData::F32(values.iter().map(|&x| x as f32).collect()),
        DType::F64 => ArrayData::F64(values.to_vec()),
        DType::BF16 => ArrayData::BF16(values.iter().map(|&x| bf16::from_f64(x)).collect()),
        DType::F16 => ArrayData::F16(values.iter().map(|&x| f16::from_f64(x)).collect()),
        DType::Bool => ArrayData::Bool(values.iter().map(|&x| x != 0.0).collect()),
        DType::I32 => ArrayData::I32(values.iter().map(|&x| x as i32).collect()),
    }
}

/// Collects `len` items into a vector reserved up front, an [`AttnError::Allocation`] naming
/// `tensor` if the memory is not there (instead of an abort).
pub(crate) fn try_collect<T>(
    tensor: &'static str,
    len: usize,
    items: impl Iterator<Item = T>,
) -> Result<Vec<T>, AttnError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| AttnError::Allocation {
            tensor,
            elements: len,
        })?;
    v.extend(items.take(len));
    Ok(v)
}

/// [`convert_f64`] of `len` values from an iterator, into one fallibly reserved buffer.
pub(crate) fn convert_iter(
    dtype: DType,
    tensor: &'static str,
    len: usize,
    values: impl Iterator<Item = f64>,
) -> Result<ArrayData, AttnError> {
    Ok(match dtype {
        DType::F32 => ArrayData::F32(try_collect(tensor, len, values.map(|x| x as f32))?),
        DType::F64 => ArrayData::F64(try_collect(tensor, len, values)?),
        DType::BF16 => ArrayData::BF16(try_collect(tensor, len, values.map(bf16::from_f64))?),
        DType::F16 => ArrayData::F16(try_collect(tensor, len, values.map(f16::from_f64))?),
        DType::Bool => ArrayData::Bool(try_collect(tensor, len, values.map(|x| x != 0.0))?),
        DType::I32 => ArrayData::I32(try_collect(tensor, len, values.map(|x| x as i32))?),
    })
}

fn data_len(data: &ArrayData) -> usize {
    match data {
        ArrayData::F32(v) => v.len(),
        ArrayData::F64(v) => v.len(),
        ArrayData::BF16(v) => v.len(),
        ArrayData::F16(v) => v.len(),
        ArrayData::Bool(v) => v.len(),
        ArrayData::I32(v) => v.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_and_casts() {
        let a = Array::new(vec![1.5f32, -2.0, 0.0, 3.25], [2, 2]).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        assert_eq!(a.as_slice::<f32>().unwrap()[3], 3.25);
        assert!(a.as_slice::<f64>().is_none());
        assert_eq!(
            a.astype(DType::Bool).to_bool_vec(),
            vec![true, true, false, true]
        );
        assert_eq!(a.astype(DType::I32).to_f64_vec(), vec![1.0, -2.0, 0.0, 3.0]);
        for dtype in [
            DType::F32,
            DType::F64,
            DType::BF16,
            DType::F16,
            DType::Bool,
            DType::I32,
        ] {
            assert_eq!(a.try_astype(dtype).unwrap(), a.astype(dtype), "{dtype}");
        }
        assert_eq!(a.try_to_f64_vec().unwrap(), a.to_f64_vec());
        assert!(Array::new(vec![1i32; 3], [2, 2]).is_err());
    }
}
