//! attn: declarative, shape-checked dot-product attention layers that agree with Flax.
pub use attn_runtime::*;
