//! The tiled backward (FlashAttention-2 style): not yet written; every call takes the
//! materialized backward.

use super::super::Call;
use super::{Partials, Widened};
use crate::context::Threads;
use crate::error::AttnError;

/// Whether the tiled backward computes this call.
pub(super) fn supports<E, B>(_call: &Call<'_, E, B>) -> bool {
    false
}

/// The partial gradients by the tiled backward.
pub(super) fn run<E, B, T>(
    _call: &Call<'_, E, B>,
    _ops: &Widened<T>,
    _want_dlogits: bool,
    _threads: Threads<'_>,
) -> Result<Partials<T>, AttnError> {
    unreachable!("supports() is false")
}
