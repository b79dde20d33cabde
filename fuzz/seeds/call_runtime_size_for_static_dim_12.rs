struct Layer {
        query: [B, T, H = 12, D = 64],
        key: [B, T, H, D],
    }
