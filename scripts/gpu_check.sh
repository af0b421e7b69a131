#!/usr/bin/env bash
# dino_rs on the GPU machine: kernel parity, the GPU tests and the benchmarks against PyTorch on the
# same card. From the repository root, with dist-cuda/ carried over (scripts/build_cuda_wheel.sh makes
# it on a CPU machine; it is git-ignored, so pass it in `carry`):
#
#   bash scripts/gpu_check.sh first   # ~4 min: parity, test_gpu, one training and one embedding row
#   bash scripts/gpu_check.sh rest    # the other benchmark rows
#   bash scripts/gpu_check.sh all     # both
#
# The first call is kept short, so that a failure leaves device time to fix it and run again.
#
# The device machine's Python is PyTorch's venv (/opt/torch/.venv, numpy and torch in it). The wheel and
# pytest are unpacked into a folder of their own on PYTHONPATH, beside that venv: a venv made *from*
# it would see the base interpreter's packages, not numpy or torch. The first step imports numpy,
# torch and dino_rs and stops within seconds, saying which, if any of them does not import.
#
# Each part runs in a process of its own (a CUDA fault loses the context of the process it happens
# in): kernel parity with blocking launches, so that a fault is raised by the kernel at fault, and
# every check runs even when one fails; then the tests, with DINO_RS_REQUIRE_CUDA=1, so that a device
# that does not open fails them instead of skipping them (and without tests/python/conftest.py, whose
# Pillow the device's venv need not have); then each benchmark row.
#
# Settings (environment):
#   DINO_RS_GPU_CHECK_PYTHON  the Python to use (default /opt/torch/.venv/bin/python3)
#   DINO_RS_GPU_CHECK_DEVICE  cuda (default), or cpu: the rehearsal on a CPU machine, which runs every
#                             part with small configurations (scripts/rehearse_gpu_check.sh)
#   DINO_RS_GPU_CHECK_WHEEL   the wheel to install (default dist-cuda/dino_rs_cu13-*.whl)
#   DINO_RS_GPU_CHECK_WHEELS  pytest's wheels, for a Python without pytest (default dist-cuda/wheels)
#   GPU_CHECK_TOTAL_S         the time for the whole call (default 240 for `first`, 540 otherwise)
# Logs go under $OUT when it is set (the device tool brings them back), else /tmp/dino_rs_gpu_check.
set -u
STAGE="${1:-first}"
case "$STAGE" in first | rest | all) ;; *) echo "usage: $0 [first|rest|all]" >&2; exit 2 ;; esac
DEVICE="${DINO_RS_GPU_CHECK_DEVICE:-cuda}"
case "$DEVICE" in cuda | cpu) ;; *) echo "DINO_RS_GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
if [ "$STAGE" = first ]; then TOTAL="${GPU_CHECK_TOTAL_S:-240}"; else TOTAL="${GPU_CHECK_TOTAL_S:-540}"; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG="${OUT:-/tmp/dino_rs_gpu_check}"
mkdir -p "$LOG"
fail() { echo "GPU CHECK FAILED: $*"; exit "${2:-3}"; }

PY="${DINO_RS_GPU_CHECK_PYTHON:-/opt/torch/.venv/bin/python3}"
[ -x "$PY" ] || fail "no Python at $PY (set DINO_RS_GPU_CHECK_PYTHON)"
WHEEL="${DINO_RS_GPU_CHECK_WHEEL:-$(ls dist-cuda/dino_rs_cu13-*.whl 2>/dev/null | head -1)}"
[ -n "$WHEEL" ] && [ -f "$WHEEL" ] ||
  fail "no wheel: build dist-cuda/ with scripts/build_cuda_wheel.sh and carry it (or set DINO_RS_GPU_CHECK_WHEEL)"

# CUDA libraries from the pip wheels next to PyTorch (CUDA 13 layout nvidia/cu13/lib, older nvidia/<pkg>/lib).
libdirs=""
for s in $("$PY" -c 'import site; print(" ".join(site.getsitepackages()))'); do
  for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && libdirs="$libdirs:$d"; done
done
for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do [ -d "$d" ] && libdirs="$libdirs:$d"; done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== setup ($STAGE, device $DEVICE, $TOTAL s)"
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || true; }
# A wheel is a zip: unpacking it is what pip --target does, and needs no pip in the device's venv.
SITE="$(mktemp -d /tmp/dino_rs_gpu_site.XXXXXX)"
"$PY" -m zipfile -e "$WHEEL" "$SITE" || fail "cannot unpack $WHEEL"
WHEELS="${DINO_RS_GPU_CHECK_WHEELS:-dist-cuda/wheels}"
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail "the device's Python has no pytest, and $WHEELS has no wheels of it"
  for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || fail "cannot unpack $w"; done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
timeout 60 "$PY" - "$DEVICE" <<'PY' 2>&1 | tee "$LOG/setup.txt"
import importlib, sys
for name in ("numpy", "torch", "pytest", "dino_rs"):
    try:
        m = importlib.import_module(name)
    except Exception as e:  # any failure to import is the answer here
        print(f"GPU CHECK FAILED: import {name}: {type(e).__name__}: {e}")
        sys.exit(4)
    print(f"{name} {getattr(m, '__version__', '?')} from {m.__file__}")
import dino_rs, torch
if sys.argv[1] == "cuda":
    print("torch.cuda.is_available():", torch.cuda.is_available())
    if dino_rs.cuda_error() is not None:
        print(f"GPU CHECK FAILED: dino_rs opens no CUDA device: {dino_rs.cuda_error()}")
        sys.exit(5)
print("dino_rs device: ok")
PY
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || exit "$rc"

parity_rc=skipped test_rc=skipped
if [ "$STAGE" != rest ]; then
  echo "== kernel parity (src/ops/parity.rs: max |device - cpu| / max |cpu|, or the error)"
  CUDA_LAUNCH_BLOCKING=1 timeout 120 "$PY" - "$DEVICE" <<'PY' 2>&1 | tee "$LOG/parity.txt"
import sys
from dino_rs._dino_rs import _kernel_parity
rows = _kernel_parity(sys.argv[1])
bad = 0
for name, err, error in rows:
    tol = 2e-2 if ".bf16" in name else 1e-4
    ok = error is None and err <= tol
    bad += not ok
    print(f"{name:40s} {error if error is not None else f'{err:.2e}'}{'' if ok else '   <-- FAILED'}")
print(f"{len(rows) - bad} passed, {bad} failed")
sys.exit(1 if bad else 0)
PY
  parity_rc=${PIPESTATUS[0]}

  echo "== tests/python/test_gpu.py"
  DINO_RS_REQUIRE_CUDA=1 DINO_RS_TEST_DEVICE="$DEVICE" timeout $(( TOTAL * 2 / 5 )) \
    "$PY" -m pytest tests/python/test_gpu.py -q -rs -p no:cacheprovider --noconftest 2>&1 | tee "$LOG/test_gpu.txt"
  test_rc=${PIPESTATUS[0]}
fi

echo "== benches/bench_gpu.py"
if [ "$DEVICE" = cuda ]; then BENCH=(--config vits16); else BENCH=(--config tiny --device cpu --warmup 1 --steps 2); fi
FIRST="peak:torch-bf16-matmul,iteration:torch-bf16-sdpa,iteration:dino_rs-bf16,embed:torch-bf16-sdpa,embed:dino_rs-bf16"
case "$STAGE" in
  first) BENCH+=(--only "$FIRST") ;;
  rest) BENCH+=(--skip "$FIRST") ;;
esac
rm -f "$LOG/bench_gpu.jsonl"
left=$(( TOTAL - SECONDS - 10 ))
[ "$left" -gt 30 ] || fail "no time left for the benchmark ($left s)"
timeout "$left" "$PY" benches/bench_gpu.py "${BENCH[@]}" --budget $(( left - 15 )) --json "$LOG/bench_gpu.jsonl" 2>&1 |
  tee "$LOG/bench_gpu.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary ($STAGE on $DEVICE, ${SECONDS} s: parity exit $parity_rc, test_gpu exit $test_rc, bench_gpu exit $bench_rc; logs in $LOG)"
[ -f "$LOG/parity.txt" ] && tail -n 1 "$LOG/parity.txt"
[ -f "$LOG/test_gpu.txt" ] && { tail -n 3 "$LOG/test_gpu.txt" | grep -E "passed|failed|error" || true; }
sed -n '/^| what/,$p' "$LOG/bench_gpu.txt"
for rc in "$parity_rc" "$test_rc" "$bench_rc"; do [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1; done
