"""Markdown tables of the structured (issue 13), layer (issue 14) and forward+backward (issue 16)
suites, with each target printed as met/missed; used by compare.py.

`results` maps (impl, case) to the JSON rows of every round; a time is the median over rounds of
each round's median. A speed-up "x× torch" is torch's time / attn's time (> 1: attn faster).
"""

import statistics
import subprocess

from grid import LAYER, STRUCTURED, visible_pairs

ATTN = "attn"
TORCH = "torch SDPA"
TORCH_LR = "torch SDPA causal_lower_right"
JAX_NN = "jax.nn.dot_product_attention"
ATTN_LAYER = "attn layer"
TORCH_MHA = "torch.nn.MultiheadAttention"
JAX_MHA = "jax.jit(flax MultiHeadDotProductAttention)"
ATTN_FB = "attn fwd+bwd"
TORCH_FB = "torch SDPA fwd+bwd"
JAX_FB = "jax.jit(jax.vjp(flax dot_product_attention))"


def t(results, impl, case, field="median_s"):
    rows = results.get((impl, case))
    vals = [r[field] for r in rows or [] if field in r]
    return statistics.median(vals) if vals else None


def ms(x):
    return "—" if x is None else f"{1e3 * x:.4g}"


def fmt(x, nd=2, unit="×"):
    return "—" if x is None else f"{x:.{nd}f}{unit}"


def div(x, y):
    return None if x is None or y is None or y == 0 else x / y


def verdict(value, target, at_least=True):
    if value is None:
        return "—"
    return "met" if (value >= target if at_least else value <= target) else "missed"


def target_row(what, value, target_text, ok):
    return f"| {what} | {value} | {target_text} | **{ok}** |"


def render_structured(results, cases, bw):
    out = ["### Structured attention (issue 13): GQA, windows, segment ids, a causal tensor\n"]
    out.append("Batch 1, one process per implementation, times in ms (median over rounds). attn: the "
               "kernel layer (`attn::kernel::attention`) with `Mask` terms; torch: SDPA with "
               "`enable_gqa=True`, `is_causal` for declared causal, an explicit bool mask for windows, "
               "segments and the causal tensor; jax: `jax.jit(jax.nn.dot_product_attention)` with "
               "`is_causal`, `local_window_size`, segment ids as a `mask`, the causal tensor as `mask`. "
               "Decode: the one query sees all 8192 keys (bottom-right causal for one query: no mask; "
               "torch also with `causal_lower_right`). Windows: `(511, 0)` = 512 keys including the "
               "query itself, causal. Packed: 8 sequences of "
               "256, 1024, 384, 768, 512, 320, 448, 384 tokens, causal within each segment.\n")
    out.append(f"| case | {ATTN} | {TORCH} | {JAX_NN} | {TORCH_LR} | speed-up vs torch | vs jax |")
    out.append("|---|---|---|---|---|---|---|")
    for c in cases:
        a, to, j, lr = (t(results, i, c) for i in (ATTN, TORCH, JAX_NN, TORCH_LR))
        out.append(f"| {c} | {ms(a)} | {ms(to)} | {ms(j)} | {ms(lr)} | {fmt(div(to, a))} | {fmt(div(j, a))} |")
    out.append("")
    out.append("| target | measured | target | |")
    out.append("|---|---|---|---|")
    for c in (x for x in cases if x.startswith("gqa_decode")):
        kv = STRUCTURED[c]["kv_bytes"]
        a, to = t(results, ATTN, c), t(results, TORCH, c)
        gbs = div(kv / 1e9, a)
        pct = None if gbs is None or bw is None else 100 * gbs / bw
        out.append(target_row(f"{c}: K/V read ({kv / 1e6:.0f} MB, once per kv head) as % of streaming",
                              f"{fmt(gbs, 1, ' GB/s')} = {fmt(pct, 0, '%')} (torch {fmt(div(kv / 1e9, to), 1, ' GB/s')})",
                              "≥ 85%", verdict(pct, 85)))
        out.append(target_row(f"{c}: vs torch SDPA", fmt(div(to, a)), "≥ 1.5×", verdict(div(to, a), 1.5)))
    c = "gqa_prefill_h32_k8_l2048_d128_causal"
    if c in cases:
        s = div(t(results, TORCH, c), t(results, ATTN, c))
        out.append(target_row(f"{c}: vs torch SDPA", fmt(s), "≥ 1.25×", verdict(s, 1.25)))
    w, full = "window512_h8_l8192_d64", "causal_h8_l8192_d64"
    if w in cases:
        share = visible_pairs(STRUCTURED[w]) / visible_pairs(STRUCTURED[full])
        predicted = None if t(results, ATTN, full) is None else t(results, ATTN, full) * share
        r = div(t(results, ATTN, w), predicted)
        out.append(target_row(
            f"{w}: time / predicted (predicted = attn's causal L=8192 time × visible pairs of the window "
            f"/ of causal = × {share:.4f})", f"{fmt(r)} ({ms(t(results, ATTN, w))} vs {ms(predicted)} ms)",
            "≤ 1.3×", verdict(r, 1.3, at_least=False)))
        s = div(t(results, TORCH, w), t(results, ATTN, w))
        out.append(target_row(f"{w}: vs torch SDPA with the bool mask", fmt(s), "≥ 3×", verdict(s, 3)))
    p, one = "packed8_h8_l4096_d64", "one_by_one8_h8_l4096_d64"
    if p in cases:
        r = div(t(results, ATTN, p), t(results, ATTN, one))
        out.append(target_row(f"{p}: packed with segment ids / the 8 sequences one by one (attn)",
                              fmt(r), "≤ 1.3×", verdict(r, 1.3, at_least=False)))
    ct, dc = "causal_tensor_h8_l4095_d64", "causal_h8_l4095_d64"
    if ct in cases:
        r = div(t(results, ATTN, ct), t(results, ATTN, dc))
        out.append(target_row(f"{ct}: bool causal tensor / declared causal (attn; \"as fast as\" read as ≤ 1.1×)",
                              fmt(r), "≤ 1.1×", verdict(r, 1.1, at_least=False)))
        s = div(t(results, TORCH, dc), t(results, ATTN, ct))
        out.append(target_row(f"{ct}: vs torch SDPA `is_causal` (torch's time / attn's with the tensor)",
                              fmt(s), "≥ 1× (informative)", verdict(s, 1.0)))
    return "\n".join(out) + "\n"


def render_layer(results, cases, bw):
    out = ["### The multi-head attention layer (issue 14)\n"]
    out.append("Forward of self-attention `[1, L, E]`, no mask, biases on, parameters and computation in "
               "the case's dtype, times in ms. attn: `MultiHeadDotProductAttention::forward`; torch: "
               "`nn.MultiheadAttention(batch_first=True)` under `inference_mode`, `need_weights=False`; "
               "jax: `jax.jit` of `flax.linen.MultiHeadDotProductAttention.apply` (deterministic).\n")
    fwd = [c for c in cases if not LAYER[c]["decode"]]
    if fwd:
        out.append(f"| case | {ATTN_LAYER} | {TORCH_MHA} | {JAX_MHA} | speed-up vs torch (target ≥ 1.25×) | vs jax |")
        out.append("|---|---|---|---|---|---|")
        for c in fwd:
            a, to, j = (t(results, i, c) for i in (ATTN_LAYER, TORCH_MHA, JAX_MHA))
            s = div(to, a)
            out.append(f"| {c} | {ms(a)} | {ms(to)} | {ms(j)} | {fmt(s)} **{verdict(s, 1.25)}** | {fmt(div(j, a))} |")
        out.append("")
    dec = [c for c in cases if LAYER[c]["decode"]]
    if dec:
        out.append("Decode step of a GQA layer (E=1024, H=32, K=8, head_dim=128; qkv_features 4096) over "
                   "4096 cached tokens: cache of capacity 4097 prefilled once with 4096 tokens; each timed "
                   "step decodes one token (reading 4097 slots) and `KvCache::truncate(4096)` resets it (no "
                   "copy). The same step over a second, empty cache of the same capacity is timed in the same process; "
                   "**cache GB/s = cache bytes / (step − empty step)** (the projections cost the same in both). "
                   "Whole step: (cache + projection kernels) bytes / step time.\n")
        out.append("| case | step ms | empty-cache step ms | cache MB | cache GB/s | % of streaming (target ≥ 85%) | whole step GB/s |")
        out.append("|---|---|---|---|---|---|---|")
        for c in dec:
            rows = results.get((ATTN_LAYER, c)) or []
            step, empty = t(results, ATTN_LAYER, c), t(results, ATTN_LAYER, c, "empty_median_s")
            cache = rows[0]["cache_bytes"] if rows else None
            params = rows[0]["param_bytes"] if rows else None
            gbs = None if None in (step, empty, cache) or step <= empty else cache / (step - empty) / 1e9
            pct = None if gbs is None or bw is None else 100 * gbs / bw
            whole = None if None in (step, cache) else (cache + params) / step / 1e9
            out.append(f"| {c} | {ms(step)} | {ms(empty)} | {fmt(None if cache is None else cache / 1e6, 1, '')} | "
                       f"{fmt(gbs, 1, '')} | {fmt(pct, 0, '%')} **{verdict(pct, 85)}** | {fmt(whole, 1, '')} |")
        out.append("")
    return "\n".join(out) + "\n"


def render_fwd_bwd(results, cases):
    out = ["### Forward + backward, f32 (issue 16)\n"]
    out.append("attn: `attn::dot_product_attention_fwd` then `attn::dot_product_attention_bwd` "
               "(`benches/grid.rs::forward_backward`); torch: SDPA through autograd, `.backward(cotangent)` "
               "(`is_causal`); jax: `jax.jit` of `jax.vjp` of Flax's `dot_product_attention` (forward and VJP "
               "in one jitted function; causal as `make_causal_mask`). Times in ms.\n")
    out.append(f"| case | {ATTN_FB} | {TORCH_FB} | {JAX_FB} | vs torch (≥ 1.25×) | vs jax (≥ 3×) |")
    out.append("|---|---|---|---|---|---|")
    for c in cases:
        a, to, j = (t(results, i, c) for i in (ATTN_FB, TORCH_FB, JAX_FB))
        st, sj = div(to, a), div(j, a)
        out.append(f"| {c} | {ms(a)} | {ms(to)} | {ms(j)} | {fmt(st)} **{verdict(st, 1.25)}** | "
                   f"{fmt(sj)} **{verdict(sj, 3)}** |")
    nc, cc = "b1_h16_l2048_d64", "b1_h16_l2048_d64_causal"
    if nc in cases and cc in cases:
        s = div(t(results, ATTN_FB, nc), t(results, ATTN_FB, cc))
        out.append(f"\nCausal speed-up at L=2048 (attn forward + backward, non-causal / causal): {fmt(s)} "
                   f"(target ≥ 1.8×: **{verdict(s, 1.8)}**; torch {fmt(div(t(results, TORCH_FB, nc), t(results, TORCH_FB, cc)))})\n")
    return "\n".join(out) + "\n"


def peak_rss(cmd):
    """Peak RSS in bytes of `cmd` under /usr/bin/time -v (None if it failed)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return None
    for line in p.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) * 1024
    return None


def memory_structured(ours, threads, cases):
    """Peak RSS of one output-path call per structure at L=8192 (and the GQA prefill), against
    the process holding only the inputs (`--reps 0`)."""
    out = ["Peak memory of the output path per structure (one call; `--reps 1` against `--reps 0`, the "
           "same process holding only its inputs and output):\n",
           "| case | q, k, v, output MiB | peak RSS MiB | inputs-only RSS MiB | peak − inputs-only MiB | L² f32 would be MiB |",
           "|---|---|---|---|---|---|"]
    from grid import STRUCTURED_MEMORY

    table = {**STRUCTURED, **STRUCTURED_MEMORY}
    for c in cases:
        base = [ours, "--threads", str(threads), "--what", "structured", "--case", c]
        peak, inputs = peak_rss(base + ["--reps", "1"]), peak_rss(base + ["--reps", "0"])
        k = table[c]
        l2 = 4 * k["h"] * k["lq"] * k["lk"] / 2**20
        mib = lambda x: "failed" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
        diff = None if peak is None or inputs is None else peak - inputs
        out.append(f"| {c} | {k['qkvo_bytes'] / 2**20:.0f} | {mib(peak)} | {mib(inputs)} | {mib(diff)} | {l2:.0f} |")
    return "\n".join(out) + "\n"


def memory_fwd_bwd(ours, threads):
    """Peak RSS of one forward + backward at B=1, H=16, L=8192, D=64 against 2× the bytes of q, k,
    v, output, its cotangent and the three gradients."""
    case = "b1_h16_l8192_d64"
    arrays = 8 * (8192 * 16 * 64 * 4)
    base = [ours, "--threads", str(threads), "--what", "fwd_bwd", "--case", case]
    peak, inputs = peak_rss(base + ["--reps", "1"]), peak_rss(base + ["--reps", "0"])
    if peak is None:
        return "\nPeak memory of forward + backward: measurement failed.\n"
    r = peak / arrays
    return (f"\nPeak memory of the output path's forward + backward at B=1, H=16, L=8192, D=64 ({threads} "
            f"threads): peak RSS {peak / 2**20:.0f} MiB for {arrays / 2**20:.0f} MiB of q, k, v, output, "
            f"cotangent and three gradients = {r:.2f}× (target < 2×: **{verdict(r, 2, at_least=False)}**; the "
            f"process holding only q, k, v and the cotangent: {(inputs or 0) / 2**20:.0f} MiB).\n")


def machine():
    """One line naming the CPU: model name, family/model, and the instruction sets the kernels of
    issue 15 care about (from /proc/cpuinfo)."""
    info, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "flags":
                    flags = set(value.split())
                elif key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    isa = [name for name in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16") if name in flags]
    cores = len(__import__("os").sched_getaffinity(0))
    return (f"CPU: {info.get('model name', '?')}, family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, {cores} CPUs usable; {', '.join(isa) or 'no AVX-512'}"
            f"{'' if 'amx_tile' in flags else '; no AMX'}")


def render_issue15(results, cases, sgemm, bw, out_impl, weights_impl, torch_impl, jax_weights_impl):
    """The targets of issue 15 on the grid, one row per (target, case), each met/missed.
    `sgemm` is the best square sgemm of the run (GFLOP/s), `bw` its streaming read bandwidth
    (GB/s); cases come from bench/grid.py."""
    from grid import CASES, flops

    def gflops(impl, c, what="output"):
        s = t(results, impl, c)
        return None if s is None else flops(CASES[c], what) / s / 1e9

    amx = "amx_tile" in machine()
    out = ["\n#### Issue 15 targets on the grid (this run)\n", machine() + "\n",
           "| target | case | measured | verdict |", "|---|---|---|---|"]
    for c in cases:
        v = CASES[c]
        decode = v["lq"] == 1
        vs_torch = div(t(results, torch_impl, c), t(results, out_impl, c))
        if decode:
            s = t(results, out_impl, c)
            pct = None if s is None or bw is None else 100 * v["kv_bytes"] / s / 1e9 / bw
            out.append(f"| decode ≥ 85% of streaming | {c} | {fmt(pct, 0, '%')} | **{verdict(pct, 85)}** |")
        if v["dtype"] == "float32":
            out.append(f"| f32 output ≥ 1.25× torch SDPA | {c} | {fmt(vs_torch)} | **{verdict(vs_torch, 1.25)}** |")
            if not decode and not v["causal"] and v["lq"] >= 512:
                o = gflops(out_impl, c)
                pct = None if o is None or sgemm is None else 100 * o / sgemm
                out.append(f"| f32 output ≥ 85% of the best sgemm | {c} | {fmt(pct, 0, '%')} | **{verdict(pct, 85)}** |")
        else:
            where = "" if amx else " (an AMX target; this CPU has no AMX)"
            out.append(f"| bf16 output ≥ 1.5× torch SDPA{where} | {c} | {fmt(vs_torch)} | **{verdict(vs_torch, 1.5)}** |")
            vs_jax = div(t(results, jax_weights_impl, c), t(results, weights_impl, c))
            out.append(f"| bf16 weights ≥ 3× jax.jit(flax weights){where} | {c} | {fmt(vs_jax)} | "
                       f"**{verdict(vs_jax, 3)}** |")
    return "\n".join(out) + "\n"
