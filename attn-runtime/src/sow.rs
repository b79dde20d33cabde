//! Sowing: where the attention weights go when a caller asks to see them, as Flax's
//! `module.sow("intermediates", "attention_weights", weights)`.

use std::collections::BTreeMap;

use crate::array::Array;

/// The collection Flax sows the attention weights into.
pub const INTERMEDIATES: &str = "intermediates";
/// The name Flax sows the attention weights under.
pub const ATTENTION_WEIGHTS: &str = "attention_weights";

/// A sink for sown values (Flax's `module` argument).
///
/// The attention functions call `sow(INTERMEDIATES, ATTENTION_WEIGHTS, weights)` once per call
/// with the post-softmax, pre-dropout weights `[batch..., heads, q_len, kv_len]` in the dtype
/// Flax gives them (float32 when `force_fp32_for_softmax` applied).
pub trait Sow {
    /// Receives one value.
    fn sow(&mut self, collection: &str, name: &str, value: Array);
}

/// A [`Sow`] sink that records every value, like Flax's `intermediates` collection: each
/// `(collection, name)` holds the values in the order they were sown.
#[derive(Clone, Debug, Default)]
pub struct Intermediates {
    values: BTreeMap<(String, String), Vec<Array>>,
}

impl Intermediates {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The values sown under `(collection, name)`, oldest first (empty if none).
    pub fn get(&self, collection: &str, name: &str) -> &[Array] {
        self.values
            .get(&(collection.to_owned(), name.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The attention weights sown so far (`get("intermediates", "attention_weights")`).
    pub fn attention_weights(&self) -> &[Array] {
        self.get(INTERMEDIATES, ATTENTION_WEIGHTS)
    }

    /// Removes and returns everything recorded.
    pub fn take(&mut self) -> BTreeMap<(String, String), Vec<Array>> {
        core::mem::take(&mut self.values)
    }
}

impl Sow for Intermediates {
    fn sow(&mut self, collection: &str, name: &str, value: Array) {
        self.values
            .entry((collection.to_owned(), name.to_owned()))
            .or_default()
            .push(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order() {
        let mut s = Intermediates::new();
        assert!(s.attention_weights().is_empty());
        s.sow(
            INTERMEDIATES,
            ATTENTION_WEIGHTS,
            Array::new(vec![1.0f32], [1]).unwrap(),
        );
        s.sow(
            INTERMEDIATES,
            ATTENTION_WEIGHTS,
            Array::new(vec![2.0f32], [1]).unwrap(),
        );
        let w = s.attention_weights();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].as_slice::<f32>(), Some(&[2.0f32][..]));
    }
}
