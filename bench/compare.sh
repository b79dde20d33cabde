#!/usr/bin/env bash
# Compares attn with jax.jit(flax) and torch SDPA on this machine; see docs/performance.md.
#
#   bench/compare.sh [--threads N] [--rounds R] [--case NAME ...]
#
# Creates bench/.venv (jax, jaxlib, flax, torch, numpy, matplotlib from PyPI; several GB, not
# part of CI), builds attn's benchmark binary (benches/harness.rs) in release mode, runs every
# implementation on the same shapes with the same thread count, interleaved, and prints medians
# and ratios. Results: bench/results/report_t<N>.md (+ raw JSON lines), plot:
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
threads=2
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads=$2; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
cd bench
"$root/$venv/bin/python" compare.py --ours "$ours" "${args[@]}"
"$root/$venv/bin/python" plot.py results/summary_t"$threads".json results/gflops_t"$threads".png --threads "$threads"
