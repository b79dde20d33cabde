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
    "b4_h8_l512_d64_bf16": _case(4, 8, 512, 512, 64, dtype="bfloat16"),
}


def flops(case, what="output"):
    """4·B·H·Lq·Lk·D for the output (2·… for weights only), dense even for causal."""
    n = case["b"] * case["h"] * case["lq"] * case["lk"] * case["d"]
    return (4 if what == "output" else 2) * n
