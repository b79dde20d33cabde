use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        precision: hihgest,
    }
}

fn main() {}
