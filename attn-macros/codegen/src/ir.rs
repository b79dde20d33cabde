//! The validated form of a layer declaration: what [`crate::expand`] turns into Rust.
//!
//! Everything here has been checked, so expansion cannot fail.

use proc_macro2::{Ident, Span};
use syn::{Attribute, Visibility};

/// One validated `struct Name { .. }` declaration.
pub struct Layer {
    /// Doc comments written on the declaration.
    pub docs: Vec<Attribute>,
    /// Visibility of the generated items.
    pub vis: Visibility,
    /// The struct's name.
    pub ident: Ident,
    /// Line of the `struct` keyword (0 if unknown).
    pub line: usize,
    /// Every named dim, in order of first appearance.
    pub dims: Vec<NamedDim>,
    /// `query: [batch.., q_len, heads, qk_depth]`
    pub query: Operand,
    /// `key: [batch.., kv_len, heads, qk_depth]`
    pub key: Operand,
    /// `value: [batch.., kv_len, heads, v_depth]`; without it the layer only computes weights.
    pub value: Option<Operand>,
    /// `bias: [..]`, broadcast to `[batch.., heads, q_len, kv_len]`.
    pub bias: Option<Operand>,
    /// `mask: causal`, `mask: [..]`, or both joined by `+`.
    pub mask: Mask,
    /// The options (Flax's keyword arguments).
    pub options: Options,
}

/// A dim written as a name.
pub struct NamedDim {
    /// The name, as first written.
    pub name: Ident,
    /// `Some(n)` if some occurrence is written `NAME = n`.
    pub size: Option<usize>,
    /// Line where the size was bound (or where the name first appears).
    pub line: usize,
    /// The name where the size was bound (or where it first appears); the compiler's notes
    /// about this dim point here.
    pub span: Span,
}

/// A tensor argument of the generated methods.
pub struct Operand {
    /// `query`, `key`, `value`, `bias`, `mask`, `query_lengths`, `kv_lengths`,
    /// `query_segment_ids` or `kv_segment_ids`.
    pub name: &'static str,
    /// The dims, outermost first.
    pub axes: Vec<Axis>,
    /// The declaration as written, e.g. `[B, T, H = 12, D = 64]`.
    pub written: String,
    /// Line of the entry.
    pub line: usize,
    /// Doc comments written on the entry.
    pub docs: Vec<String>,
    /// The entry's name in the declaration; the compiler's notes about the argument point here.
    pub span: Span,
}

/// One dim of an operand.
#[derive(Clone)]
pub enum Axis {
    /// A named dim (see [`Layer::dims`]).
    Named(Ident),
    /// A literal size.
    Size(usize),
}

/// The mask of a layer: the AND of every term written (`mask: causal(bottom_right) + window(..)`).
pub struct Mask {
    /// `causal`: keep key `j` for query `i` only if `j <= i + offset`.
    pub causal: Option<Align>,
    /// `window(left, right)`: keep key `j` only within `pos(i) - left ..= pos(i) + right`.
    pub window: Option<Window>,
    /// `query_lengths`: an `i32` argument `[batch..]`; query rows past the length see no key.
    pub query_lengths: Option<Operand>,
    /// `kv_lengths`: an `i32` argument `[batch..]`; keys past the length are invisible.
    pub kv_lengths: Option<Operand>,
    /// `segment_ids`: `i32` arguments `[batch.., q_len]` and `[batch.., kv_len]`.
    pub segment_ids: Option<(Operand, Operand)>,
    /// A mask tensor argument (`true` = attend).
    pub explicit: Option<Operand>,
    /// Line of the `mask` entry (0 if there is none).
    pub line: usize,
    /// The `mask` entry's value as written (empty if there is none).
    pub written: String,
}

/// Where query row `i` sits among the keys (for `causal` and `window`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Align {
    /// `top_left`: position `i` (Flax's `make_causal_mask`).
    TopLeft,
    /// `bottom_right`: position `i + kv_len - q_len` (KV-cache decoding, chunked prefill).
    BottomRight,
    /// `offset = n`: position `i + n`.
    Offset(i64),
}

/// `window(left, right)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Window {
    /// Keys visible before the query's position.
    pub left: usize,
    /// Keys visible after the query's position.
    pub right: usize,
    /// The alignment (the causal term's, or the window's own third argument).
    pub align: Align,
}

impl Mask {
    /// Whether the mask uses anything beyond today's `causal` (top-left) and mask tensor.
    pub fn is_structured(&self) -> bool {
        !matches!(self.causal, None | Some(Align::TopLeft))
            || self.window.is_some()
            || self.query_lengths.is_some()
            || self.kv_lengths.is_some()
            || self.segment_ids.is_some()
    }

    /// The `i32` arguments of the structures, in signature order.
    pub fn index_operands(&self) -> Vec<&Operand> {
        let mut all: Vec<&Operand> = Vec::new();
        all.extend(&self.query_lengths);
        all.extend(&self.kv_lengths);
        if let Some((query, key)) = &self.segment_ids {
            all.push(query);
            all.push(key);
        }
        all
    }
}

/// The element type of the inputs, which is also Flax's computation `dtype`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DType {
    /// `f32`
    F32,
    /// `f64`
    F64,
    /// `bf16`
    BF16,
    /// `f16`
    F16,
}

/// Flax's `precision` (no effect on the CPU, accepted for parity).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Precision {
    /// `default`
    Default,
    /// `high`
    High,
    /// `highest`
    Highest,
}

/// The options of a layer, with Flax's defaults where not written.
pub struct Options {
    /// `dtype` (default `f32`).
    pub dtype: DType,
    /// `dropout_rate` in `[0, 1)` (default 0).
    pub dropout_rate: f64,
    /// `broadcast_dropout` (default `true`).
    pub broadcast_dropout: bool,
    /// `precision` (default `default`).
    pub precision: Precision,
    /// `force_fp32_for_softmax` (default `false`).
    pub force_fp32_for_softmax: bool,
    /// `sow: attention_weights`: the weights are sown into the context's sink, as Flax's
    /// `module.sow("intermediates", "attention_weights", ..)`.
    pub sow: bool,
    /// `scale`: multiplies the logits instead of Flax's `1 / sqrt(depth)`.
    pub scale: Option<f64>,
}

impl Operand {
    /// Whether one of the dims is the named dim `name`.
    pub fn uses(&self, name: &Ident) -> bool {
        self.axes
            .iter()
            .any(|axis| matches!(axis, Axis::Named(n) if n == name))
    }
}

impl DType {
    /// The Rust element type's name (`half::bf16` for `bf16`).
    pub fn rust_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl Layer {
    /// The element type of the attention weights, as Flax computes it: the computation dtype,
    /// except `float32` when `force_fp32_for_softmax` applies to a non-`f32` dtype.
    pub fn weights_dtype(&self) -> DType {
        if self.options.force_fp32_for_softmax {
            DType::F32
        } else {
            self.options.dtype
        }
    }

    /// The element type of the output: the computation dtype, except `float32` when
    /// `force_fp32_for_softmax` applies to `bf16`/`f16` inputs (the `f32` weights promote it).
    pub fn output_dtype(&self) -> DType {
        match (self.options.force_fp32_for_softmax, self.options.dtype) {
            (true, DType::BF16 | DType::F16) => DType::F32,
            (_, dtype) => dtype,
        }
    }

    /// The declared size of a named dim, if static.
    pub fn static_size(&self, name: &Ident) -> Option<usize> {
        self.dims
            .iter()
            .find(|d| d.name == *name)
            .and_then(|d| d.size)
    }

    /// Whether `key` and `value` have other heads than `query` (grouped-query attention).
    pub fn grouped(&self) -> bool {
        let heads = |operand: &Operand| operand.axes[operand.axes.len() - 2].clone();
        !same_axis(self, &heads(&self.query), &heads(&self.key))
    }

    /// Number of batch dims.
    pub fn batch_rank(&self) -> usize {
        self.query.axes.len() - 3
    }
}

/// Two dims are the same if they have the same name or the same static size.
fn same_axis(layer: &Layer, a: &Axis, b: &Axis) -> bool {
    let size = |axis: &Axis| match axis {
        Axis::Named(name) => layer.static_size(name),
        Axis::Size(n) => Some(*n),
    };
    match (a, b) {
        (Axis::Named(x), Axis::Named(y)) if x == y => true,
        _ => matches!((size(a), size(b)), (Some(x), Some(y)) if x == y),
    }
}
