use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H = 12, D = 64],
        key: [B, S, H = 8, D],
    }
}

fn main() {}
