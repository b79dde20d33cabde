//! The non-tensor options of a Flax-semantics call ([`Options`], [`Precision`]): plain types
//! that the entry points, [`Call`] and the drivers share; it imports no other part of the
//! kernels.
//!
//! [`Call`]: super::call::Call

/// `jax.lax.Precision`: accepted for parity with Flax; it has no effect on the CPU (as in JAX,
/// where all values give bit-identical results on the CPU backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// `None` / `DEFAULT`
    #[default]
    Default,
    /// `HIGH`
    High,
    /// `HIGHEST`
    Highest,
}

/// The non-tensor options of an attention call. `Options::default()` has Flax's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// `None`: Flax's scaling, `query / round(sqrt(depth))` (as XLA computes it). `Some(s)`:
    /// the query is multiplied by `s` (rounded to the computation dtype) instead.
    pub scale: Option<f64>,
    /// Flax's `dropout_rate`, in `[0, 1]`.
    pub dropout_rate: f64,
    /// Flax's `broadcast_dropout`: one dropout mask `[q, kv]` shared by batch and heads.
    pub broadcast_dropout: bool,
    /// Flax's `force_fp32_for_softmax`.
    pub force_fp32_for_softmax: bool,
    /// Flax's `precision` (no effect on the CPU).
    pub precision: Precision,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scale: None,
            dropout_rate: 0.0,
            broadcast_dropout: true,
            force_fp32_for_softmax: false,
            precision: Precision::Default,
        }
    }
}
