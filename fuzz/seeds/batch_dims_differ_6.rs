struct SameRankOtherName {
        query: [B, T, H, D],
        key: [C, S, H, D],
    }
