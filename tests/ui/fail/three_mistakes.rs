use attn::attention;

// Three separate mistakes, all reported by one build.
attention! {
    pub struct Gpt2Attention {
        query: [B, T, H = 12, D = 64],
        key: [B, T, H, 32],
        value: [B, T, H, D],
        mask: causal,
        dropout_rate: 1.5,
        dtpye: f32,
    }
}

fn main() {}
