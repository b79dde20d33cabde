//! Runtime of `attn`: tensors, shapes, kernels, masks, dropout and sow hooks.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod kernel;
