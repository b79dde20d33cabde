"""Bar chart of GFLOP/s by shape for each implementation, from compare.py's summary JSON.

    python plot.py results/summary_t2.json out.png --threads 2
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grid import CASES, flops  # noqa: E402

IMPLS = [
    ("attn output path", "output", "#1f77b4"),
    ("torch SDPA", "output", "#ff7f0e"),
    ("jax.jit(flax dot_product_attention)", "output", "#2ca02c"),
    ("attn weights path", "weights", "#9ecae1"),
    ("jax.jit(flax dot_product_attention_weights)", "weights", "#98df8a"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("summary")
    ap.add_argument("png")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with open(a.summary) as f:
        med = json.load(f)
    cases = [c for c in CASES if any(f"{impl}|{c}" in med for impl, _, _ in IMPLS)]
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / len(IMPLS)
    for k, (impl, what, color) in enumerate(IMPLS):
        xs, ys = [], []
        for i, c in enumerate(cases):
            s = med.get(f"{impl}|{c}")
            if s:
                xs.append(i + (k - len(IMPLS) / 2 + 0.5) * width)
                ys.append(flops(CASES[c], what) / s / 1e9)
        ax.bar(xs, ys, width, label=impl, color=color)
    sgemm = [2.0 * n**3 / med[f"{impl}|sgemm_n{n}"] / 1e9 for impl in ("torch sgemm", "jax sgemm")
             for n in (1024, 2048) if f"{impl}|sgemm_n{n}" in med]
    if sgemm:
        ax.axhline(max(sgemm), color="gray", linestyle="--", linewidth=1, label=f"best square sgemm ({max(sgemm):.0f})")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace("_", "\n", 1) for c in cases], fontsize=8)
    ax.set_ylabel("GFLOP/s (4·B·H·Lq·Lk·D, dense; weights: 2·…)")
    ax.set_yscale("log")
    ax.set_title(f"Attention on the CPU, {a.threads} thread{'s' if a.threads > 1 else ''}, f32 unless noted")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)


if __name__ == "__main__":
    main()
