struct Layer {
        query: [T, H = 4, D],
        key: [S, H, D],
        mask: [H, T, S],
    }
