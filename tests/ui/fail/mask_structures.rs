use attn::attention;

attention! {
    struct Alignments {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal(lower_right) + causal(3) + window(4, 0, offset = x),
    }

    struct Windows {
        query: [T, H, D],
        key: [S, H, D],
        mask: window(512) + window(1, -2) + window(1,, 2),
    }

    struct Twice {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal + causal(bottom_right) + kv_lengths + kv_lengths,
    }

    struct Conflict {
        query: [T, H, D],
        key: [S, H, D],
        mask: causal(bottom_right) + window(8, 0, top_left),
    }

    struct Names {
        query: [B, T, H, D],
        key: [B, S, H, D],
        mask: lengths + segments + causal_lower_right + local_window_size,
    }

    struct Arguments {
        query: [B, T, H, D],
        key: [B, S, H, D],
        mask: query_lengths(B) + segment_ids[B, T] + causal[bottom_right],
    }

    struct Forms {
        query: [T, H, D],
        key: [S, H, D],
        mask: window + causal() + causal(offset = 99999999999999999999),
    }

    struct Sides {
        query: [T, H, D],
        key: [S, H, D],
        mask: window(L, 0.5),
    }
}

fn main() {}
