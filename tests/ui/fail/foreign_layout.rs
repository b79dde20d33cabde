use attn::attention;

attention! {
    /// PyTorch's `[batch, heads, len, depth]`.
    struct Torch {
        query: [batch, heads, len, depth],
        key: [batch, heads, len, depth],
        value: [batch, heads, len, depth],
    }

    /// The heads of the bias say where the query's heads are.
    struct ThroughBias {
        query: [B, N, L, E],
        key: [B, N, M, E],
        bias: [B, N, L, M],
    }

    /// Time-major `[len, batch, heads, depth]`.
    struct TimeMajor {
        query: [T, B, H, D],
        key: [S, B, H, D],
    }
}

fn main() {}
