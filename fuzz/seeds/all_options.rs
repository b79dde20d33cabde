pub(crate) struct Cross {
    query: [B, N, T, H = 4, 16],
    key: [B, N, S, H, 16],
    value: [B, N, S, H, Dv = 8],
    bias: [N, 1, T, S],
    mask: causal + [B, 1, 1, 1, S],
    dropout_rate: 0.25,
    broadcast_dropout: false,
    dtype: bf16,
    precision: highest,
    force_fp32_for_softmax: true,
    scale: 0.125,
}
struct WeightsOnly { query: [T, H, D], key: [S, H, D] }
