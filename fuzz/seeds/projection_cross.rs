pub struct Cross {
    inputs_q: [B, T, 32],
    inputs_k: [B, S, 24],
    inputs_v: [B, S, 16],
    heads: 4,
    normalize_qk: true,
    mask: [B, 1, T, S],
    sow: attention_weights,
}
