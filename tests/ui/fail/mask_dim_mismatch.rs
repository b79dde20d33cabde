use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H, D],
        key: [B, S, H, D],
        mask: causal + [B, 1, S, T],
    }
}

fn main() {}
