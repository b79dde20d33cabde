use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H, D],
        key: [B, S, H, D],
        value: [B, T, H, D],
    }
}

fn main() {}
