//! The sizes of an attention call ([`Geometry`]): a plain type that the entry points, [`Call`]
//! and the drivers share; it imports no other part of the kernels.
//!
//! [`Call`]: super::call::Call

use crate::dim::Dim;

/// Sizes of one attention call. Dims are type parameters so that generated code can pass
/// static sizes ([`Const<N>`](crate::Const)) or run-time sizes (`usize`) alike.
#[derive(Clone, Copy, Debug)]
pub struct Geometry<'b, H: Dim, G: Dim, Dk: Dim, Dv: Dim> {
    /// Zero or more leading batch dims, shared by query, key, value and the results.
    pub batch_shape: &'b [usize],
    /// Query length.
    pub q_len: usize,
    /// Key/value length.
    pub kv_len: usize,
    /// Number of query heads.
    pub heads: H,
    /// Number of key/value heads: `heads` itself, or a divisor of it (grouped-query attention;
    /// 1 is multi-query attention). Query head `n` reads key/value head `n / (heads / kv_heads)`.
    pub kv_heads: G,
    /// Depth of query and key per head.
    pub qk_depth: Dk,
    /// Depth of value per head (ignored by [`attention_weights`](super::attention_weights)).
    pub v_depth: Dv,
}
