/// bf16 attention with the softmax in bf16 (Flax's default).
    struct Bf16Softmax {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: bf16,
    }

    /// bf16 attention with the softmax forced to float32: weights and output are `f32`.
    struct Fp32Softmax {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: bf16,
        force_fp32_for_softmax: true,
    }

    /// The same layer in float64, as the reference.
    struct Reference {
        query: [T, H = 4, D = 32],
        key:   [S, H, D],
        value: [S, H, D],
        dtype: f64,
    }
