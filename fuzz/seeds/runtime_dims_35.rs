/// Self-attention with static heads and depth.
    pub struct SelfAttention {
        query: [B, T, H = 2, D = 4],
        key: [B, T, H, D],
        value: [B, T, H, D],
        mask: causal,
    }
