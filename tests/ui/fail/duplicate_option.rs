use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        dropout_rate: 0.1,
        dtype: f32,
        dropout_rate: 0.2,
    }
}

fn main() {}
