struct OtherRank {
        query: [B, T, H, D],
        key: [S, H, D],
        value: [B1, B2, S, H, D],
    }
