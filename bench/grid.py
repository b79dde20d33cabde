"""The benchmark grid shared by bench/peers.py and bench/compare.py (mirrors benches/grid.rs)."""


def _case(b, h, lq, lk, d, causal=False, dtype="float32"):
    itemsize = 2 if dtype == "bfloat16" else 4
    return {"b": b, "h": h, "lq": lq, "lk": lk, "d": d, "causal": causal, "dtype": dtype,
            "kv_bytes": 2 * b * lk * h * d * itemsize}


CASES = {
    "b1_h8_l128_d64": _case(1, 8, 128, 128, 64),
    "b4_h8_l512_d64": _case(4, 8, 512, 512, 64),
    "b4_h8_l512_d64_causal": _case(4, 8, 512, 512, 64, causal=True),
    "b1_h16_l2048_d64": _case(1, 16, 2048, 2048, 64),
    "b1_h16_l2048_d64_causal": _case(1, 16, 2048, 2048, 64, causal=True),
    "b2_h12_l1024_d128": _case(2, 12, 1024, 1024, 128),
    "decode_b8_h8_q1_kv4096_d128": _case(8, 8, 1, 4096, 128),
    "b2_h16_l1024_d80": _case(2, 16, 1024, 1024, 80),
    "b2_h12_l1024_d96": _case(2, 12, 1024, 1024, 96),
    "b1_h16_l2000_d64": _case(1, 16, 2000, 2000, 64),
    "b1_h16_l2000_d64_causal": _case(1, 16, 2000, 2000, 64, causal=True),
    "b4_h8_l512_d64_bf16": _case(4, 8, 512, 512, 64, dtype="bfloat16"),
    "b1_h16_l2048_d64_bf16": _case(1, 16, 2048, 2048, 64, dtype="bfloat16"),
    "b1_h16_l2048_d64_causal_bf16": _case(1, 16, 2048, 2048, 64, causal=True, dtype="bfloat16"),
    "b2_h12_l1024_d128_bf16": _case(2, 12, 1024, 1024, 128, dtype="bfloat16"),
    "decode_b8_h8_q1_kv4096_d128_bf16": _case(8, 8, 1, 4096, 128, dtype="bfloat16"),
}


def flops(case, what="output"):
    """4·B·H·Lq·Lk·D for the output (2·… for weights only), dense even for causal."""
    n = case["b"] * case["h"] * case["lq"] * case["lk"] * case["d"]
    return (4 if what == "output" else 2) * n


# The structured suite (issue 13; mirrors STRUCTURED in benches/grid.rs). Batch 1; every
# structure but "none" is causal, top-left (q_len == kv_len, so bottom-right is the same).
# "window": causal and a sliding window (left, 0): query i sees keys i-left ..= i (left+1 keys).
# "segments": packed sequences with segment ids, causal within each segment.
# "one_by_one": the same sequences run one by one (attn only).
# "causal_tensor": causal handed over as a bool tensor [1, 1, L, L] (Flax's make_causal_mask).
PACKED8 = [256, 1024, 384, 768, 512, 320, 448, 384]
PACKED16 = PACKED8 + PACKED8


def _structured(h, k, lq, lk, d, structure, dtype="float32", window=None, segments=None):
    itemsize = 2 if dtype == "bfloat16" else 4
    return {"h": h, "kvh": k, "lq": lq, "lk": lk, "d": d, "dtype": dtype, "structure": structure,
            "window": window, "segments": segments, "kv_bytes": 2 * lk * k * d * itemsize,
            "qkvo_bytes": 2 * lq * h * d * itemsize + 2 * lk * k * d * itemsize}


STRUCTURED = {
    "gqa_decode_h32_k8_kv8192_d128": _structured(32, 8, 1, 8192, 128, "none"),
    "gqa_decode_h32_k8_kv8192_d128_bf16": _structured(32, 8, 1, 8192, 128, "none", dtype="bfloat16"),
    "gqa_prefill_h32_k8_l2048_d128_causal": _structured(32, 8, 2048, 2048, 128, "causal"),
    "window512_h8_l8192_d64": _structured(8, 8, 8192, 8192, 64, "window", window=(511, 0)),
    "causal_h8_l8192_d64": _structured(8, 8, 8192, 8192, 64, "causal"),
    "packed8_h8_l4096_d64": _structured(8, 8, 4096, 4096, 64, "segments", segments=PACKED8),
    "one_by_one8_h8_l4096_d64": _structured(8, 8, 4096, 4096, 64, "one_by_one", segments=PACKED8),
    "causal_tensor_h8_l4095_d64": _structured(8, 8, 4095, 4095, 64, "causal_tensor"),
    "causal_h8_l4095_d64": _structured(8, 8, 4095, 4095, 64, "causal"),
}
# Only for the structured suite's peak-memory report (attn's output path at L=8192).
STRUCTURED_MEMORY = {
    "packed16_h8_l8192_d64": _structured(8, 8, 8192, 8192, 64, "segments", segments=PACKED16),
}


def _layer(e, h, l, dtype="float32", kvh=None, hd=None, decode=False):
    return {"e": e, "h": h, "kvh": kvh or h, "hd": hd or e // h, "l": l, "dtype": dtype, "decode": decode}


# The layer suite (issue 14; mirrors LAYER in benches/grid.rs). Forward cases: self-attention of
# inputs [1, l, e], no mask, biases on, parameters and computation in dtype. Decode cases: one
# decode step of a GQA layer over l cached tokens (attn only).
LAYER = {
    "mha_e768_h12_l512": _layer(768, 12, 512),
    "mha_e768_h12_l512_bf16": _layer(768, 12, 512, dtype="bfloat16"),
    "mha_e768_h12_l2048": _layer(768, 12, 2048),
    "mha_e768_h12_l2048_bf16": _layer(768, 12, 2048, dtype="bfloat16"),
    "decode_gqa_e1024_h32_k8_d128_kv4096": _layer(1024, 32, 4096, kvh=8, hd=128, decode=True),
    "decode_gqa_e1024_h32_k8_d128_kv4096_bf16": _layer(1024, 32, 4096, dtype="bfloat16", kvh=8, hd=128, decode=True),
}

# The forward + backward suite (issue 16): the f32 cases of the grid (+ the memory case, for the
# peak-memory run only).
FWD_BWD = [c for c, v in CASES.items() if v["dtype"] == "float32"]
MEMORY_FWD_BWD = "b1_h16_l8192_d64"


def visible_pairs(case):
    """(query, key) pairs a structured case computes (for the window's work-share rule)."""
    lq = case["lq"]
    s = case["structure"]
    if s == "none":
        return lq * case["lk"]
    if s in ("causal", "causal_tensor"):
        return lq * (lq + 1) // 2
    if s == "window":
        w = case["window"][0] + 1
        return w * (w + 1) // 2 + (lq - w) * w
    return sum(n * (n + 1) // 2 for n in case["segments"])
