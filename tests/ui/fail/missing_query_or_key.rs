use attn::attention;

attention! {
    struct NoQuery {
        key: [S, H, D],
        value: [S, H, D],
    }

    struct NoKey {
        query: [T, H, D],
    }
}

fn main() {}
