use attn::attention;

attention! {
    struct Layer {
        query: [T, D],
        key: [B1, B2, B3, B4, B5, B6, S, H, D],
    }
}

fn main() {}
