//! What the backward's drivers (`weights.rs`, `tiled.rs`) share with `mod.rs`, which runs them:
//! their operands ([`Widened`]), the row statistics the forward saved ([`RowStats`]) and what
//! each driver returns ([`Partials`]). Plain data: it imports nothing of the kernels, so that
//! the drivers need not import `mod.rs`, which imports them.

use std::borrow::Cow;

/// The per-row statistics the tiled backward reads instead of recomputing them, indexed
/// `(b · q_len + i) · heads + h`.
pub(super) struct RowStats<'s, T> {
    /// `max + ln(sum)` of the row's masked logits.
    pub(super) lse: &'s [f64],
    /// `D_i = dO_i · O_i` (= `rowsum(P ⊙ dP)`).
    pub(super) d: Vec<T>,
}

/// What the per-(batch, head) tasks produce, in the arithmetic type `T`.
pub(super) struct Partials<T> {
    /// `[batch, q, heads, qk_depth]`: the query gradient (final up to the cast).
    pub(super) dq: Vec<T>,
    /// `[batch, heads, kv, qk_depth]`: each query head's share of the key gradient.
    pub(super) dk: Vec<T>,
    /// `[batch, heads, kv, v_depth]`: each query head's share of the value gradient.
    pub(super) dv: Vec<T>,
    /// `[batch, heads, q, kv]`: the gradient of the biased logits (only with a bias gradient).
    pub(super) dlogits: Option<Vec<T>>,
    /// Whether `dk` and `dv` are in the gradients' own layout `[batch, kv, kv_heads, depth]`
    /// already (no grouped heads to sum).
    pub(super) dkv_final: bool,
}

/// The operands of the backward in the arithmetic type: the query scaled and rounded as the
/// forward's logits see it, the key, the value and the cotangent.
pub(super) struct Widened<'a, T: Clone> {
    /// The query times the scale, rounded as the forward rounds it.
    pub(super) qs: Vec<T>,
    /// Borrowed when the input is of the arithmetic type already.
    pub(super) k: Cow<'a, [T]>,
    /// The value (empty for the weights' backward), borrowed as the key.
    pub(super) v: Cow<'a, [T]>,
    /// The cotangent (of the output, or of the weights with [`Widened::of_weights`]).
    pub(super) d: Vec<T>,
    /// Whether `d` is the cotangent of the weights (else of the output).
    pub(super) of_weights: bool,
}
