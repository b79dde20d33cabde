use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H, D],
        key: [B, S, H, D],
        bias: [B, 2, T, X],
    }
}

fn main() {}
