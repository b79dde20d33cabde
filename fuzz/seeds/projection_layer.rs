/// Llama-style GQA self-attention with a KV cache.
pub struct LlamaAttention {
    inputs_q: [B, T, E = 4096],
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    out_features: 4096,
    use_bias: false,
    mask: causal,
    dtype: bf16,
    param_dtype: f32,
    cache: 8192,
}
