use attn::attention;

attention! {
    struct Ampersand {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal & kv_lengths,
    }

    struct NoPlus {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal(bottom_right) window(8, 0),
    }

    struct Comma {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal, [T, S],
    }
}

fn main() {}
