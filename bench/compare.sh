#!/usr/bin/env bash
# Compares attn with jax.jit(flax) and torch SDPA on this machine; see docs/performance.md.
#
#   bench/compare.sh [--threads N] [--rounds R] [--suite grid|structured|layer|fwd_bwd ...]
#                    [--case NAME ...] [--no-memory] [--libs attn,torch,jax]
#
# Creates bench/.venv (jax, jaxlib, flax, torch, numpy, matplotlib from PyPI; several GB, not
# part of CI), builds attn's benchmark binary (benches/harness.rs) in release mode, runs every
# implementation on the same shapes with the same thread count, interleaved, and prints medians
# and ratios, each issue's targets as met/missed. Results: bench/results/report_<suites>_t<N>.md
# (<suites> = "all" without --suite; + raw JSON lines), plot of the grid suite:
# bench/results/gflops_t<N>.png.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=bench/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import jax, flax, torch, numpy, matplotlib" 2>/dev/null; then
    "$venv/bin/pip" install --quiet jax jaxlib flax torch numpy matplotlib
fi
cargo build --release --bench harness --message-format=json-render-diagnostics > target/harness-build.json
ours=$("$venv/bin/python" - <<'PY'
import json
for line in open("target/harness-build.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "harness" and m.get("executable"):
        print(m["executable"])
PY
)
args=("$@")
cd bench
"$root/$venv/bin/python" compare.py --ours "$ours" "${args[@]}"
