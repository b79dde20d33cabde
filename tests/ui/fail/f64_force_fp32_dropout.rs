use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        dtype: f64,
        force_fp32_for_softmax: true,
        dropout_rate: 0.1,
    }
}

fn main() {}
