use attn::attention;

attention! {
    struct Jax {
        query: [T, H, D],
        key: [S, H, D],
        dtype: jnp.float32,
    }

    struct NumPyName {
        query: [T, H, D],
        key: [S, H, D],
        dtype: float32,
    }

    struct Torch {
        query: [T, H, D],
        key: [S, H, D],
        dtype: torch.bfloat16,
    }

    struct Quoted {
        query: [T, H, D],
        key: [S, H, D],
        dtype: "float16",
    }

    struct NotAFloat {
        query: [T, H, D],
        key: [S, H, D],
        dtype: np.int8,
    }
}

fn main() {}
