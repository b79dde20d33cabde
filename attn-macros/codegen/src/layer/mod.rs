//! Projection layers: declarations with `inputs_q` instead of `query`/`key`, which generate a
//! `flax.linen.MultiHeadDotProductAttention` with its parameters (a struct wrapping
//! `attn::layer::MultiHeadDotProductAttention`). The syntax is the attention core's
//! ([`mod@crate::parse`]); [`crate::validate::projection`] checks a declaration into a
//! [`ProjectionLayer`] and [`expand()`] turns it into Rust.

mod expand;
mod training;

pub use expand::expand;

use proc_macro2::{Ident, Span};
use syn::{Attribute, Visibility};

use crate::ir::{Align, Axis, DType, NamedDim, Precision};
use crate::parse::LayerSyntax;

/// The entries only a projection layer has; a declaration with one of them (and no `query`,
/// `key` or `value`) is a projection layer.
pub const PROJECTION_KEYS: &[&str] = &[
    "inputs_q",
    "inputs_k",
    "inputs_v",
    "heads",
    "kv_heads",
    "head_dim",
    "qkv_features",
    "out_features",
    "use_bias",
    "normalize_qk",
    "param_dtype",
    "cache",
];

/// Whether `layer` declares a projection layer: it has `inputs_q`, `inputs_k` or `inputs_v`, or
/// it has no `query`, `key` or `value` and one of [`PROJECTION_KEYS`].
pub fn is_projection(layer: &LayerSyntax) -> bool {
    let has = |names: &[&str]| {
        layer
            .entries
            .iter()
            .any(|entry| names.iter().any(|name| entry.key == name))
    };
    has(&["inputs_q", "inputs_k", "inputs_v"])
        || (!has(&["query", "key", "value"]) && has(PROJECTION_KEYS))
}

/// One validated projection layer.
pub struct ProjectionLayer {
    /// Doc comments written on the declaration.
    pub docs: Vec<Attribute>,
    /// Visibility of the generated items.
    pub vis: Visibility,
    /// The struct's name.
    pub ident: Ident,
    /// Line of the `struct` keyword.
    pub line: usize,
    /// Every named dim, in order of first appearance.
    pub dims: Vec<NamedDim>,
    /// `inputs_q: [batch.., len, features]`.
    pub inputs_q: Input,
    /// `inputs_k: [batch.., kv_len, features]` (cross-attention), if declared.
    pub inputs_k: Option<Input>,
    /// `inputs_v: [batch.., kv_len, features]`, if declared (only with `inputs_k`).
    pub inputs_v: Option<Input>,
    /// Flax's `num_heads`.
    pub heads: usize,
    /// Key/value heads (grouped-query attention); `heads` when not declared.
    pub kv_heads: usize,
    /// Whether `kv_heads` was declared.
    pub grouped: bool,
    /// `qkv_features / heads`.
    pub head_dim: usize,
    /// Flax's `qkv_features` (default: the features of `inputs_q`).
    pub qkv_features: usize,
    /// Flax's `out_features` (default: the features of `inputs_q`).
    pub out_features: usize,
    /// Flax's `use_bias` (default `true`).
    pub use_bias: bool,
    /// Flax's `normalize_qk` (default `false`).
    pub normalize_qk: bool,
    /// Flax's `dtype`: `None` when not declared (the inputs are then `f32`).
    pub dtype: Option<DType>,
    /// Flax's `param_dtype` (default `f32`).
    pub param_dtype: DType,
    /// Flax's `dropout_rate`.
    pub dropout_rate: f64,
    /// Flax's `broadcast_dropout`.
    pub broadcast_dropout: bool,
    /// Flax's `precision`, if declared.
    pub precision: Option<Precision>,
    /// Flax's `force_fp32_for_softmax`.
    pub force_fp32_for_softmax: bool,
    /// `sow: attention_weights`.
    pub sow: bool,
    /// `mask: causal(..)`.
    pub causal: Option<Align>,
    /// `mask: [..]`: a `bool` mask argument of `forward`.
    pub mask: Option<Input>,
    /// The `mask` entry as written (empty if none).
    pub mask_written: String,
    /// `cache: ..`.
    pub cache: Option<Cache>,
}

/// A tensor argument: an input `[batch.., len, features]` or a mask.
pub struct Input {
    /// `inputs_q`, `inputs_k`, `inputs_v` or `mask`.
    pub name: &'static str,
    /// The dims, outermost first.
    pub axes: Vec<Axis>,
    /// As written, e.g. `[B, T, E = 4096]`.
    pub written: String,
    /// Line of the entry.
    pub line: usize,
    /// The entry's name (for spans of generated items).
    pub span: Span,
}

/// `cache: N`, `cache: dynamic` or `cache: sliding_window(W)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cache {
    /// A capacity fixed at compile time.
    Static(usize),
    /// A capacity chosen when the cache is created.
    Dynamic,
    /// A ring buffer of the last `W` tokens (Mistral's sliding window).
    SlidingWindow(usize),
}

impl ProjectionLayer {
    /// The features (last dim) of an input, which are static.
    pub fn features(&self, input: &Input) -> usize {
        match input.axes.last() {
            Some(Axis::Size(n)) => *n,
            Some(Axis::Named(name)) => self.static_size(name).unwrap_or(0),
            None => 0,
        }
    }

    /// The declared size of a named dim, if static.
    pub fn static_size(&self, name: &Ident) -> Option<usize> {
        self.dims
            .iter()
            .find(|d| d.name == *name)
            .and_then(|d| d.size)
    }

    /// The element type of the inputs: `dtype`; when it is not declared (Flax's `dtype=None`,
    /// computing in the promotion of the inputs and the parameters), `f64` for `f64`
    /// parameters, else `f32`.
    pub fn input_dtype(&self) -> DType {
        match (self.dtype, self.param_dtype) {
            (Some(dtype), _) => dtype,
            (None, DType::F64) => DType::F64,
            (None, _) => DType::F32,
        }
    }

    /// The element type of the output: `dtype`, or (Flax's `dtype=None`) the promotion of
    /// the `f32` inputs with `param_dtype`, which is `f64` only for `f64` parameters.
    pub fn output_dtype(&self) -> DType {
        self.input_dtype()
    }
}
