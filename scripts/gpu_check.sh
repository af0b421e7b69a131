#!/usr/bin/env bash
# On the GPU machine, from the repository root, with dist-cuda/ carried over (scripts/build_cuda_wheel.sh
# makes it on a CPU machine; it is git-ignored, so pass it in `carry`):
#
#   bash scripts/gpu_check.sh
#
# Installs the CUDA wheel (and pytest, from dist-cuda/wheels: the machine has no network) into a venv
# on top of the machine's PyTorch venv, runs the GPU tests (tests/python/test_gpu.py: CUDA against
# CPU) and the GPU benchmarks (benches/bench_gpu.py: against PyTorch on the same card), and prints a
# short table last. Logs go under $OUT when it is set. Stays under GPU_CHECK_TOTAL_S (default 560 s,
# below the 600 s a device command may run).
set -u
TOTAL="${GPU_CHECK_TOTAL_S:-560}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG="${OUT:-/tmp/dino_rs_gpu_check}"
mkdir -p "$LOG"

BASE_PY=/opt/torch/.venv/bin/python3
[ -x "$BASE_PY" ] || BASE_PY=python3
# CUDA libraries from the pip wheels next to PyTorch (CUDA 13 layout nvidia/cu13/lib, older nvidia/<pkg>/lib).
libdirs=""
for s in $("$BASE_PY" -c 'import site; print(" ".join(site.getsitepackages()))'); do
  for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && libdirs="$libdirs:$d"; done
done
for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do [ -d "$d" ] && libdirs="$libdirs:$d"; done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || true

WHEEL=$(ls dist-cuda/dino_rs-*.whl 2>/dev/null | head -1)
[ -n "$WHEEL" ] || { echo "no dist-cuda/dino_rs-*.whl: build it with scripts/build_cuda_wheel.sh and carry dist-cuda"; exit 3; }
VENV=/tmp/dino_rs_gpu_venv
"$BASE_PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --force-reinstall "$WHEEL" || exit 4
"$VENV/bin/python" -c 'import pytest' 2>/dev/null ||
  "$VENV/bin/python" -m pip install -q --no-index --find-links dist-cuda/wheels pytest || exit 4
PY="$VENV/bin/python"
echo "== dino_rs $("$PY" -c 'import dino_rs as d; print(d.__version__, "cuda_is_available:", d.cuda_is_available())')"

echo "== each kernel against the CPU (src/ops/parity.rs: max |cuda - cpu| / max |cpu|)"
timeout 120 "$PY" -c 'from dino_rs._dino_rs import _kernel_parity
for name, err in _kernel_parity("cuda"): print(f"{name:40s} {err:.2e}")' 2>&1 | tee "$LOG/parity.txt"

echo "== tests/python/test_gpu.py"
timeout $(( TOTAL / 3 )) "$PY" -m pytest tests/python/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$LOG/test_gpu.txt"
test_rc=${PIPESTATUS[0]}

echo "== benches/bench_gpu.py"
rm -f "$LOG/bench_gpu.jsonl"
left=$(( TOTAL - SECONDS - 10 ))
timeout "$left" "$PY" benches/bench_gpu.py --budget $(( left - 15 )) --json "$LOG/bench_gpu.jsonl" 2>&1 |
  tee "$LOG/bench_gpu.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary (test_gpu exit $test_rc, bench_gpu exit $bench_rc; logs in $LOG)"
tail -n 3 "$LOG/test_gpu.txt" | grep -E "passed|failed|error" || true
sed -n '/^| what/,$p' "$LOG/bench_gpu.txt"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
