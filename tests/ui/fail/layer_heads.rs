use attn::attention;

// Heads that do not divide the features, key/value heads that do not divide the heads, and a
// head_dim that disagrees with qkv_features: each at its token, all in one build.
attention! {
    pub struct Features {
        inputs_q: [B, T, E = 30],
        heads: 4,
    }

    pub struct Grouped {
        inputs_q: [B, T, E = 64],
        heads: 8,
        kv_heads: 3,
    }

    pub struct HeadDim {
        inputs_q: [B, T, E = 64],
        heads: 8,
        head_dim: 16,
        qkv_features: 64,
    }

    pub struct Qkv {
        inputs_q: [B, T, E = 64],
        heads: 6,
        qkv_features: 64,
    }
}

fn main() {}
