use attn::attention;

attention! {
    struct SameRankOtherName {
        query: [B, T, H, D],
        key: [C, S, H, D],
    }
}

attention! {
    struct OtherRank {
        query: [B, T, H, D],
        key: [S, H, D],
        value: [B1, B2, S, H, D],
    }
}

fn main() {}
