use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H, D],
        key: [B, S, K, D],
    }
}

fn main() {}
