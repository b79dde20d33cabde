use attn::attention;

attention! {
    /// 8 key/value heads serve 32 query heads (grouped-query attention): accepted.
    struct Llama {
        query: [B, T, H = 32, D = 128],
        key: [B, S, G = 8, D],
        value: [B, S, G, D],
    }

    /// 6 does not divide 32.
    struct SixOfThirtyTwo {
        query: [B, T, H = 32, D = 128],
        key: [B, S, G = 6, D],
        value: [B, S, G, D],
    }

    /// More key/value heads than query heads.
    struct MoreKeyHeads {
        query: [B, T, 4, D],
        key: [B, S, 8, D],
    }

    /// Value heads must be the key's.
    struct ValueHeads {
        query: [B, T, H = 32, D],
        key: [B, S, G = 8, D],
        value: [B, S, H, D],
    }
}

fn main() {}
