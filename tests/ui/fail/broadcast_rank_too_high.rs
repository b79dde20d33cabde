use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        bias: [B, H, T, S],
        mask: [1, 1, 1, T, S],
    }
}

fn main() {}
