use attn::attention;

// Mistakes in the inputs, mask and cache of projection layers.
attention! {
    pub struct RunTimeFeatures {
        inputs_q: [B, T, E],
        heads: 4,
    }

    pub struct ValuesWithoutKeys {
        inputs_q: [B, T, E = 16],
        inputs_v: [B, S, 16],
        heads: 4,
    }

    pub struct CrossCache {
        inputs_q: [B, T, E = 16],
        inputs_k: [C, S, E],
        heads: 4,
        mask: window(3, 0) + [B, 1, T, T],
        cache: 128,
    }

    pub struct NoHeads {
        inputs_q: [B, T, 16, 4],
        cache: sliding_window(0),
    }
}

fn main() {}
