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

from grid import CASES, flops


def timed(fn, min_seconds=0.4, min_reps=5, max_reps=200):
    """Median seconds of `fn()` after 2 warm-up calls (JAX compiles there)."""
    fn()
    fn()
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
    p.add_argument("--what", choices=["output", "weights", "sgemm", "bandwidth"], default="output")
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
