//! Runtime of `attn`: tensors, shapes, kernels, masks, dropout and sow hooks.
//!
//! Two layers compute Flax's `dot_product_attention_weights` / `dot_product_attention` on the CPU:
//! - [`kernel`]: typed, strided kernels over `[batch..., len, heads, depth]` slices (what
//!   `attention!`-generated code calls);
//! - [`flax`]: the same functions over dynamically shaped [`Array`]s, with every Flax parameter,
//!   plus `make_attention_mask`, `make_causal_mask` and `combine_masks`.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod array;
pub mod context;
pub mod dim;
pub mod element;
pub mod error;
pub mod flax;
pub mod jax_nn;
pub mod kernel;
pub mod layer;
pub mod sow;
pub mod tensor;

/// `half` (the `bf16` / `f16` element types), re-exported so callers use the same version.
pub use half;
/// `rayon`, re-exported for building the thread pool a [`Context`] can run on.
pub use rayon;

pub use array::{Array, ArrayData};
pub use context::{Context, DropoutRng};
pub use dim::{Const, ConstDim, Dim, DimEq, Shape};
pub use element::{DType, Element, Scalar};
pub use error::AttnError;
pub use flax::{
    AttentionGrads, FlaxArgs, PairwiseFn, combine_masks, dot_product_attention,
    dot_product_attention_bwd, dot_product_attention_fwd, dot_product_attention_vjp,
    dot_product_attention_weights, dot_product_attention_weights_vjp, make_attention_mask,
    make_causal_mask,
};
pub use kernel::{Broadcast, Geometry, Mask, Options, Precision, Residuals};
pub use sow::{Intermediates, Sow};
pub use tensor::{Gradients, Tensor, TensorView, TensorViewMut};
