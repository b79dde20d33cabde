struct Layer {
        query: [T, 2, 8],
        key: [S, 2, 8],
    }
