/// One head over a sequence, with an additive `[T, T]` bias and a causal mask; the weights
    /// are sown into the context's sink.
    struct Heatmap {
        query: [T, H = 1, D = 8],
        key:   [T, H, D],
        value: [T, H, D],
        bias:  [T, T],
        mask: causal,
        sow: attention_weights,
    }
