"""Runs attn and its peers on the same shapes with the same thread count, interleaved, and
prints medians and ratios (a Markdown report). Started by bench/compare.sh.

Every job runs in its own process, pinned with taskset to the first `--threads` CPUs; each
round runs every job once, in a rotated order, so slow drifts of the machine hit all
implementations alike. A cell is the median over rounds of each round's median time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from grid import CASES, flops

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

OURS_OUT = "attn output path"
OURS_W = "attn weights path"
JAX_OUT = "jax.jit(flax dot_product_attention)"
JAX_W = "jax.jit(flax dot_product_attention_weights)"
TORCH = "torch SDPA"


def jobs(ours, threads, cases):
    cpus = ",".join(str(c) for c in range(threads))
    pin = ["taskset", "-c", cpus]
    xla = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1 else ""
    env_jax = {"XLA_FLAGS": xla, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": str(threads)}
    env_torch = {"OMP_NUM_THREADS": str(threads)}
    case_args = [a for c in cases for a in ("--case", c)]
    peer = [PY, os.path.join(HERE, "peers.py"), "--threads", str(threads)]
    return {
        "ours output": (pin + [ours, "--threads", str(threads), "--what", "output"] + case_args, {}),
        "ours weights": (pin + [ours, "--threads", str(threads), "--what", "weights"] + case_args, {}),
        "jax output": (pin + peer + ["--lib", "jax", "--what", "output"] + case_args, env_jax),
        "jax weights": (pin + peer + ["--lib", "jax", "--what", "weights"] + case_args, env_jax),
        "torch output": (pin + peer + ["--lib", "torch", "--what", "output"] + case_args, env_torch),
        "sgemm torch": (pin + peer + ["--lib", "torch", "--what", "sgemm"], env_torch),
        "sgemm jax": (pin + peer + ["--lib", "jax", "--what", "sgemm"], env_jax),
        "bandwidth torch": (pin + peer + ["--lib", "torch", "--what", "bandwidth"], env_torch),
        "bandwidth ours": (pin + [ours, "--threads", str(threads), "--what", "bandwidth"], {}),
    }


def load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_job(cmd, env, log):
    t = time.time()
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    rows = []
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    log.write(f"# {time.strftime('%H:%M:%S')} load {load():.2f} ({time.time() - t:.1f} s) {' '.join(cmd)}\n")
    if p.returncode != 0:
        log.write(p.stderr[-2000:] + "\n")
    for r in rows:
        log.write(json.dumps(r) + "\n")
    log.flush()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="path of attn's benchmark binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    cases = a.case or list(CASES)
    os.makedirs(a.out, exist_ok=True)
    raw_path = os.path.join(a.out, f"raw_t{a.threads}.jsonl")
    todo = jobs(a.ours, a.threads, cases)
    names = list(todo)
    results = {}  # (impl, case) -> [round medians]
    with open(raw_path, "w") as log:
        for r in range(a.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                cmd, env = todo[name]
                for row in run_job(cmd, env, log):
                    if "error" in row or "median_s" not in row:
                        continue
                    results.setdefault((row["impl"], row["case"]), []).append(row)
            print(f"round {r + 1}/{a.rounds} done, load {load():.2f}", file=sys.stderr, flush=True)
    report = render(results, cases, a.threads, a.rounds)
    report += memory_report(a.ours, a.threads)
    with open(os.path.join(a.out, f"report_t{a.threads}.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.out, f"summary_t{a.threads}.json"), "w") as f:
        json.dump({f"{k[0]}|{k[1]}": med_time(v) for k, v in results.items()}, f, indent=1)
    print(report)


def memory_report(ours, threads):
    """Peak RSS of one process that runs the output path once at B=1, H=16, L=8192, D=64."""
    case = "b1_h16_l8192_d64"
    qkvo = 4 * (1 * 8192 * 16 * 64 * 4)
    peaks = {}
    for what in ("inputs", "output"):
        cmd = ["/usr/bin/time", "-v", ours, "--threads", str(threads), "--what", what, "--case", case, "--reps", "1"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        for line in p.stderr.splitlines():
            if "Maximum resident set size" in line:
                peaks[what] = int(line.split(":")[1]) * 1024
    if "output" not in peaks:
        return "\nPeak memory: measurement failed.\n"
    base = peaks.get("inputs")
    return (f"\nPeak memory of the output path at B=1, H=16, L=8192, D=64 ({threads} threads): peak RSS "
            f"{peaks['output'] / 2**20:.0f} MiB for {qkvo / 2**20:.0f} MiB of q, k, v and output = "
            f"{peaks['output'] / qkvo:.2f}× (the same process holding only q, k, v and output: "
            f"{(base or 0) / 2**20:.0f} MiB).\n")


def med_time(rows):
    return statistics.median(r["median_s"] for r in rows)


def spread(rows):
    ts = [r["median_s"] for r in rows]
    return (max(ts) - min(ts)) / statistics.median(ts) if len(ts) > 1 else 0.0


def render(results, cases, threads, rounds):
    def t(impl, case):
        rows = results.get((impl, case))
        return med_time(rows) if rows else None

    def gf(impl, case, what="output"):
        s = t(impl, case)
        return flops(CASES[case], what) / s / 1e9 if s else None

    def fmt(x, nd=0):
        return "—" if x is None else f"{x:.{nd}f}"

    def ratio(x, y):
        return None if x is None or y is None else x / y

    sgemm = max((gf_s for gf_s in [
        (2.0 * n**3 / t(impl, f"sgemm_n{n}") / 1e9) if t(impl, f"sgemm_n{n}") else None
        for impl in ("torch sgemm", "jax sgemm") for n in (1024, 2048)] if gf_s), default=None)
    bws = [(impl, 536870912 / t(impl, "read_512MiB") / 1e9) for impl in ("torch read", "attn read")
           if t(impl, "read_512MiB")]
    bw = max((b for _, b in bws), default=None)
    out = []
    out.append(f"### {threads} thread{'s' if threads > 1 else ''}: median GFLOP/s (flops = 4·B·H·Lq·Lk·D, dense even for causal; median over {rounds} interleaved rounds)\n")
    out.append(f"Best square sgemm: **{fmt(sgemm)} GFLOP/s**; streaming read bandwidth: **{fmt(bw, 1)} GB/s** "
               f"({', '.join(f'{i} {b:.1f}' for i, b in bws)}).\n")
    out.append("| case | attn output | torch SDPA | jax flax output | attn weights | jax flax weights | attn/torch | attn/jax | attn % of sgemm | weights attn/jax |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        o, tt, j = gf(OURS_OUT, c), gf(TORCH, c), gf(JAX_OUT, c)
        w, jw = gf(OURS_W, c, "weights"), gf(JAX_W, c, "weights")
        pct = None if o is None or sgemm is None else 100 * o / sgemm
        out.append(f"| {c} | {fmt(o)} | {fmt(tt)} | {fmt(j)} | {fmt(w)} | {fmt(jw)} | {fmt(ratio(o, tt), 2)}× | "
                   f"{fmt(ratio(o, j), 2)}× | {fmt(pct)}% | {fmt(ratio(w, jw), 2)}× |")
    out.append("")
    out.append("Median times (ms) and round-to-round spread:\n")
    out.append("| case | " + " | ".join([OURS_OUT, TORCH, JAX_OUT, OURS_W, JAX_W]) + " |")
    out.append("|---|" + "---|" * 5)
    for c in cases:
        cells = []
        for impl in (OURS_OUT, TORCH, JAX_OUT, OURS_W, JAX_W):
            rows = results.get((impl, c))
            cells.append("—" if not rows else f"{1e3 * med_time(rows):.3g} (±{50 * spread(rows):.0f}%)")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out.append("")
    dec = "decode_b8_h8_q1_kv4096_d128"
    if dec in cases:
        kv = CASES[dec]["kv_bytes"]
        line = "Decode (K+V = {:.0f} MB read once per call): ".format(kv / 1e6)
        parts = []
        for impl in (OURS_OUT, TORCH, JAX_OUT):
            s = t(impl, dec)
            if s:
                parts.append(f"{impl} {kv / s / 1e9:.1f} GB/s" + (f" ({100 * kv / s / 1e9 / bw:.0f}% of streaming)" if bw else ""))
        out.append(line + "; ".join(parts) + "\n")
    nc, cc = "b1_h16_l2048_d64", "b1_h16_l2048_d64_causal"
    if t(OURS_OUT, nc) and t(OURS_OUT, cc):
        out.append(f"Causal speed-up at L=2048 (attn output): {t(OURS_OUT, nc) / t(OURS_OUT, cc):.2f}× "
                   f"(torch SDPA: {fmt(ratio(t(TORCH, nc), t(TORCH, cc)), 2)}×)\n")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
