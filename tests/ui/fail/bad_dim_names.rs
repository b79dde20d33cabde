use attn::attention;

attention! {
    struct Layer {
        query: [f32, T, H, D],
        key: [f32, S, H, D],
        value: [f32, S, H, match],
    }
}

fn main() {}
