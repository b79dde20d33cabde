//! Helpers that the projection layers of `attention!` (declarations with `inputs_q`) call
//! through `attn::__private`; not public API. They move typed tensors into the runtime layer
//! (`attn::layer::MultiHeadDotProductAttention`) and its results back into typed tensors.

use attn_runtime::layer::{ArrayRef, LayerElement};
use attn_runtime::{Array, AttnError, Shape, Tensor, TensorView};

/// The dims of `view`, for [`view_ref`] to borrow.
pub fn dims_of<T, S: Shape>(view: &TensorView<'_, T, S>) -> Vec<usize>
where
    T: LayerElement,
{
    view.shape().dims()
}

/// Borrows a typed input as the runtime layer's [`ArrayRef`] (no copy).
///
/// # Errors
///
/// [`AttnError`] if `dims` does not describe `view`'s elements (it always does when it comes
/// from [`dims_of`]).
pub fn view_ref<'a, T: LayerElement, S: Shape>(
    view: TensorView<'a, T, S>,
    dims: &'a [usize],
) -> Result<ArrayRef<'a>, AttnError> {
    ArrayRef::new(view.as_slice(), dims)
}

/// A typed `bool` mask as the runtime's [`Array`] (one copy of the mask).
///
/// # Errors
///
/// [`AttnError`] if the mask's length does not match its shape (it always does for a view).
pub fn mask_array<S: Shape>(mask: TensorView<'_, bool, S>) -> Result<Array, AttnError> {
    Array::new(mask.as_slice().to_vec(), mask.shape().dims())
}

/// Moves a result of the runtime layer into a typed tensor of `shape` (no copy).
///
/// # Errors
///
/// [`AttnError::InvalidArgument`] naming `name` if the result has another element type or
/// shape than the declaration says (a bug in the layer, never the caller's input).
pub fn typed<T: LayerElement, S: Shape>(
    name: &'static str,
    array: Array,
    shape: S,
) -> Result<Tensor<T, S>, AttnError> {
    let (dtype, dims) = (array.dtype(), array.shape().to_vec());
    if dims != shape.dims() {
        return Err(AttnError::InvalidArgument {
            argument: name,
            reason: format!(
                "the layer returned shape {dims:?}, expected {:?}",
                shape.dims()
            ),
        });
    }
    let (data, _) = array.into_parts();
    let data = T::take(data).ok_or_else(|| AttnError::InvalidArgument {
        argument: name,
        reason: format!(
            "the layer returned {dtype}, expected {}",
            std::any::type_name::<T>()
        ),
    })?;
    Tensor::from_vec(data, shape)
}

/// Borrows a typed input as the runtime layer's [`ArrayRef`] owning its shape, for a pullback
/// that outlives the call (no copy of the elements).
///
/// # Errors
///
/// [`AttnError`] if the view's length disagrees with its shape (it never does).
pub fn view_ref_owned<'a, T: LayerElement, S: Shape>(
    view: TensorView<'a, T, S>,
) -> Result<ArrayRef<'a>, AttnError> {
    ArrayRef::from_slice(view.as_slice(), view.shape().dims())
}

/// A typed view as the runtime's [`Array`] (one copy): the cotangent of a pullback.
///
/// # Errors
///
/// [`AttnError`] if the view's length disagrees with its shape (it never does).
pub fn array_of<T: LayerElement + attn_runtime::Scalar, S: Shape>(
    view: TensorView<'_, T, S>,
) -> Result<Array, AttnError> {
    Array::new(view.as_slice().to_vec(), view.shape().dims())
}
