/// Decoder queries attend to the encoder's keys and values; `S` (encoder length) and `T`
    /// (decoder length) differ, and `mask` marks the real (non-padding) encoder tokens.
    pub struct CrossAttention {
        query: [B, T, H = 4, D = 16],
        key:   [B, S, H, D],
        value: [B, S, H, D],
        /// `true` for real encoder tokens, `false` for padding.
        mask:  [B, 1, 1, S],
    }
