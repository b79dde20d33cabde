/// Attention over two batch dims with a per-sequence bias shared by all beams.
    struct BeamAttention {
        query: [Beam, B, T, H = 2, D = 8],
        key:   [Beam, B, S, H, D],
        value: [Beam, B, S, H, Dv = 4],
        bias:  [B, 1, T, S],
    }
