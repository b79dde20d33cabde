"""Times the peers of attn on the shapes of the comparison grid.

One JSON object per measurement on stdout. Run by bench/compare.sh (which sets the thread count
with taskset and the libraries' own knobs); can be run alone:

    bench/.venv/bin/python bench/peers.py --lib torch --threads 2 --case b4_h8_l512_d64
"""

import argparse
import json
import os
import sys
import time

from grid import CASES, LAYER, STRUCTURED, flops


def timed(fn, min_seconds=0.4, min_reps=5, max_reps=200):
    """Median seconds of `fn()` after 2 warm-up calls (JAX compiles there); as attn's harness,
    a call slower than 1 s (after the first) gets 3 timed calls."""
    fn()
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > 1.0:
        min_reps, max_reps = 3, 3
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[0], len(times)


def inputs(np, case, dtype):
    rng = np.random.default_rng(0)
    b, h, lq, lk, d = case["b"], case["h"], case["lq"], case["lk"], case["d"]
    q = rng.standard_normal((b, lq, h, d), dtype=np.float32)
    k = rng.standard_normal((b, lk, h, d), dtype=np.float32)
    v = rng.standard_normal((b, lk, h, d), dtype=np.float32)
    return q, k, v


def jax_jobs(case, what):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    q, k, v = inputs(np, case, case["dtype"])
    dt = jnp.bfloat16 if case["dtype"] == "bfloat16" else jnp.float32
    q, k, v = (jnp.asarray(x, dtype=dt) for x in (q, k, v))
    mask = None
    if case["causal"]:
        mask = jnp.tril(jnp.ones((1, 1, case["lq"], case["lk"]), dtype=bool))
    if what == "output":
        f = jax.jit(lambda q, k, v, m: nn.dot_product_attention(q, k, v, mask=m, deterministic=True))
        return lambda: f(q, k, v, mask).block_until_ready()
    f = jax.jit(lambda q, k, m: nn.dot_product_attention_weights(q, k, mask=m, deterministic=True))
    return lambda: f(q, k, mask).block_until_ready()


def torch_jobs(case, what):
    import numpy as np
    import torch

    q, k, v = inputs(np, case, case["dtype"])
    dt = torch.bfloat16 if case["dtype"] == "bfloat16" else torch.float32
    # Flax layout [B, L, H, D]; SDPA wants [B, H, L, D]: pass transposed views, as a user with
    # flax-layout tensors would.
    q, k, v = (torch.from_numpy(x).to(dt).transpose(1, 2) for x in (q, k, v))
    assert what == "output"

    def run():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case["causal"])

    return run


def structured_mask(np, case):
    """The bool [L, L] visibility of a structured case (True attends), or None."""
    lq, lk, s = case["lq"], case["lk"], case["structure"]
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    if s == "window":
        return (j <= i) & (j >= i - case["window"][0])
    if s == "segments":
        seg = np.repeat(np.arange(len(case["segments"])), case["segments"])
        return (seg[:, None] == seg[None, :]) & (j <= i)
    if s == "causal_tensor":
        return j <= i
    return None


def structured_inputs(np, case):
    """q [1, lq, h, d], k and v [1, lk, kvh, d]: `case["inputs"]` if given (checks), else
    random normal."""
    if "inputs" in case:
        return case["inputs"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, case["lq"], case["h"], case["d"]), dtype=np.float32)
    k = rng.standard_normal((1, case["lk"], case["kvh"], case["d"]), dtype=np.float32)
    v = rng.standard_normal((1, case["lk"], case["kvh"], case["d"]), dtype=np.float32)
    return q, k, v


def structured_jobs(lib, case):
    """{impl name: fn} for a structured case. torch: SDPA with enable_gqa, `is_causal` for
    declared causal, an explicit bool mask for windows, segments and the causal tensor (and, for
    decode, also `causal_lower_right`). jax: jax.jit(jax.nn.dot_product_attention) with
    `is_causal`, `local_window_size`, segment ids as a mask, the causal tensor as `mask`."""
    import numpy as np

    s = case["structure"]
    if s == "one_by_one":
        return {}
    q, k, v = structured_inputs(np, case)
    mask = structured_mask(np, case)
    causal = s in ("causal", "window", "segments")
    if lib == "torch":
        import torch
        from torch.nn.attention.bias import causal_lower_right

        dt = torch.bfloat16 if case["dtype"] == "bfloat16" else torch.float32
        q, k, v = (torch.from_numpy(x).to(dt).transpose(1, 2) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tmask = None if mask is None else torch.from_numpy(mask)

        def run():
            with torch.inference_mode():
                if tmask is not None:
                    return sdpa(q, k, v, attn_mask=tmask, enable_gqa=True)
                return sdpa(q, k, v, is_causal=s == "causal", enable_gqa=True)

        jobs = {"torch SDPA": run}
        if s == "none":
            bias = causal_lower_right(case["lq"], case["lk"])

            def run_lr():
                with torch.inference_mode():
                    return sdpa(q, k, v, attn_mask=bias, enable_gqa=True)

            jobs["torch SDPA causal_lower_right"] = run_lr
        return jobs
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16 if case["dtype"] == "bfloat16" else jnp.float32
    q, k, v = (jnp.asarray(x, dtype=dt) for x in (q, k, v))
    window = case["window"] if s == "window" else None
    jmask = None
    if s in ("segments", "causal_tensor"):
        jmask = jnp.asarray(mask)[None, None]
    f = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, mask=m, is_causal=causal, local_window_size=window))
    return {"jax.nn.dot_product_attention": lambda: f(q, k, v, jmask).block_until_ready()}


def layer_jobs(lib, case):
    """{impl name: fn}: torch.nn.MultiheadAttention(batch_first=True) under inference_mode
    (need_weights=False), or jax.jit of flax.linen.MultiHeadDotProductAttention.apply
    (deterministic); parameters and computation in the case's dtype. Decode cases: attn only."""
    import numpy as np

    if case["decode"]:
        return {}
    x = np.random.default_rng(0).standard_normal((1, case["l"], case["e"]), dtype=np.float32)
    if lib == "torch":
        import torch

        dt = torch.bfloat16 if case["dtype"] == "bfloat16" else torch.float32
        m = torch.nn.MultiheadAttention(case["e"], case["h"], batch_first=True, dtype=dt).eval()
        xt = torch.from_numpy(x).to(dt)

        def run():
            with torch.inference_mode():
                return m(xt, xt, xt, need_weights=False)[0]

        return {"torch.nn.MultiheadAttention": run}
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    dt = jnp.bfloat16 if case["dtype"] == "bfloat16" else jnp.float32
    m = nn.MultiHeadDotProductAttention(num_heads=case["h"], dtype=dt, param_dtype=dt)
    xj = jnp.asarray(x, dtype=dt)
    params = m.init(jax.random.PRNGKey(0), xj)
    f = jax.jit(lambda p, x: m.apply(p, x, deterministic=True))
    return {"jax.jit(flax MultiHeadDotProductAttention)": lambda: f(params, xj).block_until_ready()}


def fwd_bwd_jobs(lib, case):
    """{impl name: fn}: forward + backward. torch: SDPA through autograd (`.backward(cotangent)`
    on transposed views of [B, L, H, D] leaves, `is_causal`); jax: jax.jit of jax.vjp of Flax's
    dot_product_attention (forward and VJP in one jitted function, causal as make_causal_mask)."""
    import numpy as np

    q, k, v = inputs(np, case, "float32")
    ct = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    if lib == "torch":
        import torch

        leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
        ctt = torch.from_numpy(ct).transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            for t in leaves:
                t.grad = None
            qt, kt, vt = (t.transpose(1, 2) for t in leaves)
            o = sdpa(qt, kt, vt, is_causal=case["causal"])
            o.backward(ctt)
            return o, [t.grad for t in leaves]

        return {"torch SDPA fwd+bwd": run}
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    q, k, v, ct = (jnp.asarray(x) for x in (q, k, v, ct))
    mask = jnp.tril(jnp.ones((1, 1, case["lq"], case["lk"]), dtype=bool)) if case["causal"] else None

    def fb(q, k, v, ct, m):
        o, vjp = jax.vjp(lambda q, k, v: nn.dot_product_attention(q, k, v, mask=m, deterministic=True), q, k, v)
        return o, vjp(ct)

    f = jax.jit(fb)
    return {"jax.jit(jax.vjp(flax dot_product_attention))": lambda: jax.block_until_ready(f(q, k, v, ct, mask))}


def sgemm(lib, n):
    if lib == "torch":
        import torch

        a = torch.randn(n, n)
        b = torch.randn(n, n)
        return lambda: torch.mm(a, b)
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return lambda: f(a).block_until_ready()


def read_bandwidth(lib):
    """Sum of a 512 MiB float32 array: bytes read per second."""
    n = 128 * 1024 * 1024
    if lib == "torch":
        import torch

        a = torch.ones(n)
        return lambda: a.sum().item(), 4 * n
    import numpy as np

    a = np.ones(n, dtype=np.float32)
    return lambda: float(a.sum()), 4 * n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lib", choices=["jax", "torch", "numpy"], required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--what", choices=["output", "weights", "sgemm", "bandwidth", "structured", "layer", "fwd_bwd"],
                   default="output")
    a = p.parse_args()
    if a.lib == "torch":
        import torch

        torch.set_num_threads(a.threads)
    tag = {"lib": a.lib, "threads": a.threads}
    if a.what == "sgemm":
        for n in (1024, 2048):
            med, best, reps = timed(sgemm(a.lib, n))
            f = 2.0 * n**3
            print(json.dumps({**tag, "impl": f"{a.lib} sgemm", "case": f"sgemm_n{n}", "median_s": med,
                              "min_s": best, "reps": reps, "flops": f, "gflops": f / med / 1e9}), flush=True)
        return
    if a.what == "bandwidth":
        fn, nbytes = read_bandwidth(a.lib)
        med, best, reps = timed(fn)
        print(json.dumps({**tag, "impl": f"{a.lib} read", "case": "read_512MiB", "median_s": med, "min_s": best,
                          "reps": reps, "bytes": nbytes, "gbps": nbytes / med / 1e9}), flush=True)
        return
    if a.what in ("structured", "layer", "fwd_bwd"):
        from grid import FWD_BWD

        table, make = {"structured": (STRUCTURED, structured_jobs), "layer": (LAYER, layer_jobs),
                       "fwd_bwd": ({c: CASES[c] for c in FWD_BWD}, fwd_bwd_jobs)}[a.what]
        for name in a.case or list(table):
            try:
                fns = make(a.lib, table[name])
                for impl, fn in fns.items():
                    med, best, reps = timed(fn)
                    print(json.dumps({**tag, "impl": impl, "what": a.what, "case": name, "median_s": med,
                                      "min_s": best, "reps": reps}), flush=True)
            except Exception as e:  # report, keep going
                print(json.dumps({**tag, "case": name, "error": repr(e)}), flush=True)
        return
    names = a.case or list(CASES)
    for name in names:
        case = CASES[name]
        if a.lib == "torch" and a.what == "weights":
            continue
        make = jax_jobs if a.lib == "jax" else torch_jobs
        try:
            fn = make(case, a.what)
            med, best, reps = timed(fn)
        except Exception as e:  # report, keep going
            print(json.dumps({**tag, "case": name, "error": repr(e)}), flush=True)
            continue
        impl = {"jax": f"jax.jit(flax {'dot_product_attention' if a.what == 'output' else 'dot_product_attention_weights'})",
                "torch": "torch SDPA"}[a.lib]
        f = flops(case, a.what)
        print(json.dumps({**tag, "impl": impl, "what": a.what, "case": name, "median_s": med, "min_s": best,
                          "reps": reps, "flops": f, "gflops": f / med / 1e9,
                          "kv_bytes": case["kv_bytes"], "gbps": case["kv_bytes"] / med / 1e9}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
