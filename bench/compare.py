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

import report
from grid import CASES, FWD_BWD, LAYER, STRUCTURED, flops

SUITES = ("grid", "structured", "layer", "fwd_bwd")
# The cases of each suite (`--case` picks among them; a suite with none picked is skipped).
SUITE_CASES = {"grid": list(CASES), "structured": list(STRUCTURED), "layer": list(LAYER), "fwd_bwd": FWD_BWD}

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

OURS_OUT = "attn output path"
OURS_W = "attn weights path"
JAX_OUT = "jax.jit(flax dot_product_attention)"
JAX_W = "jax.jit(flax dot_product_attention_weights)"
TORCH = "torch SDPA"


def jobs(ours, threads, picked):
    """{job name: (command, env)} of the picked cases ({suite: [case]})."""
    cpus = ",".join(str(c) for c in range(threads))
    pin = ["taskset", "-c", cpus]
    xla = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1 else ""
    env_jax = {"XLA_FLAGS": xla, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": str(threads)}
    env_torch = {"OMP_NUM_THREADS": str(threads)}
    peer = [PY, os.path.join(HERE, "peers.py"), "--threads", str(threads)]
    attn = pin + [ours, "--threads", str(threads), "--what"]
    todo = {}
    for suite, cases in picked.items():
        case_args = [a for c in cases for a in ("--case", c)]
        whats = ["output", "weights"] if suite == "grid" else [suite]
        for what in whats:
            todo[f"ours {what}"] = (attn + [what] + case_args, {})
            todo[f"jax {what}"] = (pin + peer + ["--lib", "jax", "--what", what] + case_args, env_jax)
            if what != "weights":
                todo[f"torch {what}"] = (pin + peer + ["--lib", "torch", "--what", what] + case_args, env_torch)
    if "grid" in picked:
        todo["sgemm torch"] = (pin + peer + ["--lib", "torch", "--what", "sgemm"], env_torch)
        todo["sgemm jax"] = (pin + peer + ["--lib", "jax", "--what", "sgemm"], env_jax)
    if picked.keys() & {"grid", "structured", "layer"}:
        todo["bandwidth torch"] = (pin + peer + ["--lib", "torch", "--what", "bandwidth"], env_torch)
        todo["bandwidth ours"] = (attn + ["bandwidth"], {})
    return todo


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
    ap.add_argument("--case", action="append", default=[], help="only these cases (of the selected suites)")
    ap.add_argument("--suite", action="append", choices=SUITES, default=[],
                    help="grid (issue 4), structured (issue 13), layer (issue 14), fwd_bwd (issue 16); default all")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--libs", default="attn,torch,jax",
                    help="comma-separated implementations to run (attn, torch, jax); default all")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    suites = a.suite or list(SUITES)
    known = {c for s in SUITES for c in SUITE_CASES[s]}
    unknown = [c for c in a.case if c not in known]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}")
    picked = {s: [c for c in SUITE_CASES[s] if not a.case or c in a.case] for s in suites}
    picked = {s: cs for s, cs in picked.items() if cs}
    if not picked:
        sys.exit("no case of the selected suites was picked")
    os.makedirs(a.out, exist_ok=True)
    tag = "_".join(picked) if a.suite else "all"
    raw_path = os.path.join(a.out, f"raw_{tag}_t{a.threads}.jsonl")
    todo = jobs(a.ours, a.threads, picked)
    libs = set(a.libs.split(","))
    lib_of = {"ours": "attn", "jax": "jax", "torch": "torch"}
    todo = {name: job for name, job in todo.items()
            if lib_of.get(name.split()[0], lib_of.get(name.split()[-1])) in libs}
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
    bw = best_bandwidth(results)
    text = f"# attn vs peers, {a.threads} thread(s), {a.rounds} interleaved round(s)\n\n{report.machine()}\n\n"
    if "grid" in picked:
        text += render(results, picked["grid"], a.threads, a.rounds)
        if not a.no_memory:
            text += memory_report(a.ours, a.threads)
    if "structured" in picked:
        text += "\n" + report.render_structured(results, picked["structured"], bw)
        if not a.no_memory:
            text += "\n" + report.memory_structured(a.ours, a.threads, [
                "window512_h8_l8192_d64", "packed16_h8_l8192_d64", "causal_h8_l8192_d64",
                "gqa_prefill_h32_k8_l2048_d128_causal"])
    if "layer" in picked:
        text += "\n" + report.render_layer(results, picked["layer"], bw)
    if "fwd_bwd" in picked:
        text += "\n" + report.render_fwd_bwd(results, picked["fwd_bwd"])
        if not a.no_memory:
            text += report.memory_fwd_bwd(a.ours, a.threads)
    if bw is not None:
        text += f"\nStreaming read bandwidth measured in this run: {bw:.1f} GB/s (best of attn's and torch's 512 MiB sum).\n"
    report_md = text
    with open(os.path.join(a.out, f"report_{tag}_t{a.threads}.md"), "w") as f:
        f.write(report_md)
    with open(os.path.join(a.out, f"summary_{tag}_t{a.threads}.json"), "w") as f:
        json.dump({f"{k[0]}|{k[1]}": med_time(v) for k, v in results.items()}, f, indent=1)
    if "grid" in picked:
        subprocess.run([PY, os.path.join(HERE, "plot.py"), os.path.join(a.out, f"summary_{tag}_t{a.threads}.json"),
                        os.path.join(a.out, f"gflops_t{a.threads}.png"), "--threads", str(a.threads)], check=False)
    print(report_md)


def best_bandwidth(results):
    """The best streaming read bandwidth (GB/s) of this run, or None."""
    bws = [536870912 / med_time(results[(impl, "read_512MiB")]) / 1e9 for impl in ("torch read", "attn read")
           if (impl, "read_512MiB") in results]
    return max(bws, default=None)


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
    for dec in (c for c in cases if CASES[c]["lq"] == 1):
        kv = CASES[dec]["kv_bytes"]
        line = "Decode {} (K+V = {:.0f} MB read once per call): ".format(dec, kv / 1e6)
        parts = []
        for impl in (OURS_OUT, TORCH, JAX_OUT):
            s = t(impl, dec)
            if s:
                parts.append(f"{impl} {kv / s / 1e9:.1f} GB/s" + (f" ({100 * kv / s / 1e9 / bw:.0f}% of streaming)" if bw else ""))
        out.append(line + "; ".join(parts) + "\n")
    out.append(report.render_issue15(results, cases, sgemm, bw, OURS_OUT, OURS_W, TORCH, JAX_W))
    nc, cc = "b1_h16_l2048_d64", "b1_h16_l2048_d64_causal"
    if t(OURS_OUT, nc) and t(OURS_OUT, cc):
        out.append(f"Causal speed-up at L=2048 (attn output): {t(OURS_OUT, nc) / t(OURS_OUT, cc):.2f}× "
                   f"(torch SDPA: {fmt(ratio(t(TORCH, nc), t(TORCH, cc)), 2)}×)\n")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
