use attn::attention;

attention! {
    struct One {
        query: [T, H, D],
        key: [S, H, D],
        dropout_rate: 1.0,
    }

    struct Negative {
        query: [T, H, D],
        key: [S, H, D],
        dropout_rate: -0.1,
    }

    struct NotANumber {
        query: [T, H, D],
        key: [S, H, D],
        dropout_rate: high,
    }
}

fn main() {}
