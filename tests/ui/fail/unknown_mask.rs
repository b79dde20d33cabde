use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        mask: casual + causal + causal,
    }
}

fn main() {}
