use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        precision: hihgest,
    }

    struct Jax {
        query: [T, H, D],
        key: [S, H, D],
        precision: jax.lax.Precision.HIGHEST,
    }
}

fn main() {}
