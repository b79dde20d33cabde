/// Causal self-attention of a GPT-2 small block.
    pub struct Gpt2Attention {
        query: [B, T, H = 12, D = 64],
        key:   [B, T, H, D],
        value: [B, T, H, D],
        mask: causal,
        dropout_rate: 0.1,
        dtype: f32,
        sow: attention_weights,
    }
