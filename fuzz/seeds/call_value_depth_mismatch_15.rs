struct Layer {
        query: [T, H = 2, D = 8],
        key: [S, H, D],
        value: [S, H, Dv = 4],
    }
