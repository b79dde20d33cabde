use attn::attention;

// Unknown, duplicate and malformed options of a projection layer, all reported by one build.
attention! {
    pub struct Layer {
        inputs_q: [B, T, E = 64],
        num_heads: 8,
        heads: 0,
        heads: 4,
        use_bias: 1,
        param_dtype: float32,
        cache: 0,
        query: [B, T, H, D],
        scale: 0.5,
        out_fetures: 32,
    }
}

fn main() {}
