use attn::attention;

attention! {
    struct Flax {
        query: [T, H, D],
        key: [S, H, D],
        dtype: bfloat16,
    }

    struct Integer {
        query: [T, H, D],
        key: [S, H, D],
        dtype: i32,
    }
}

fn main() {}
