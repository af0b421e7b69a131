#!/usr/bin/env bash
# Rehearses scripts/gpu_check.sh on a CPU machine, unchanged but for DINO_RS_GPU_CHECK_DEVICE=cpu,
# before a device run is spent on it (not part of CI: it installs PyTorch, ~5 GB):
#
#   bash scripts/rehearse_gpu_check.sh
#
# The device's Python is PyTorch's venv. The stand-in here is made the same way: a venv with numpy
# and torch and without pytest, so that the check unpacks pytest from the carried wheels as it must
# there. First a control: a venv made from the stand-in with --system-site-packages (what the check
# once did) must NOT see torch; if it did, the stand-in would not reproduce the device's layout.
# Then both calls of the device run, `first` and `rest`, with a wheel of the working tree (any wheel
# of the current commit stands in for the CUDA one) and small configurations. Each must exit 0 and
# print every section.
#
# Settings: DINO_RS_REHEARSAL_WORK (default /tmp/dino_rs_rehearsal) keeps the stand-in venv, the
# wheel and pytest's wheels between runs; DINO_RS_GPU_CHECK_WHEEL skips building the wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${DINO_RS_REHEARSAL_WORK:-/tmp/dino_rs_rehearsal}"
BASE="$WORK/torchvenv"
mkdir -p "$WORK"
cd "$ROOT"

if ! "$BASE/bin/python3" -c 'import numpy, torch' 2>/dev/null; then
  python3 -m venv "$BASE"
  "$BASE/bin/python3" -m pip install -q numpy torch
fi
"$BASE/bin/python3" -c 'import sys; assert sys.prefix != sys.base_prefix, "the stand-in must be a venv"'
"$BASE/bin/python3" -m pip uninstall -q -y pytest 2>/dev/null || true

rm -rf "$WORK/nested"
"$BASE/bin/python3" -m venv --without-pip --system-site-packages "$WORK/nested"
if "$WORK/nested/bin/python3" -c 'import torch' 2>/dev/null; then
  echo "REHEARSAL FAILED: a venv made from the stand-in sees torch; the stand-in is not laid out as the device's" >&2
  exit 1
fi
echo "control: a venv made from the stand-in venv does not see torch (as on the device)"

if [ -z "${DINO_RS_GPU_CHECK_WHEEL:-}" ]; then
  rm -rf "$WORK/dist"
  python3 -m maturin build --release -q -o "$WORK/dist"
  DINO_RS_GPU_CHECK_WHEEL="$(ls "$WORK"/dist/dino_rs-*.whl | head -1)"
fi
export DINO_RS_GPU_CHECK_WHEEL
# pytest and its dependencies as wheels, as scripts/build_cuda_wheel.sh carries them in dist-cuda/wheels.
rm -rf "$WORK/wheels"
"$BASE/bin/python3" -m pip download -q --only-binary=:all: -d "$WORK/wheels" pytest
export DINO_RS_GPU_CHECK_WHEELS="$WORK/wheels" DINO_RS_GPU_CHECK_PYTHON="$BASE/bin/python3" DINO_RS_GPU_CHECK_DEVICE=cpu

for stage in first rest; do
  out="$WORK/$stage"
  rm -rf "$out" && mkdir -p "$out"
  set +e
  OUT="$out" GPU_CHECK_TOTAL_S=540 bash scripts/gpu_check.sh "$stage" | tee "$out/console.txt"
  rc=${PIPESTATUS[0]}
  set -e
  for section in "== setup" "== benches/bench_gpu.py" "== summary" "| what"; do
    grep -q "^$section" "$out/console.txt" || { echo "REHEARSAL FAILED: $stage printed no '$section'" >&2; exit 1; }
  done
  if [ "$stage" = first ]; then
    for section in "== kernel parity" "== tests/python/test_gpu.py"; do
      grep -q "^$section" "$out/console.txt" || { echo "REHEARSAL FAILED: $stage printed no '$section'" >&2; exit 1; }
    done
  fi
  [ "$rc" = 0 ] || { echo "REHEARSAL FAILED: gpu_check.sh $stage exited $rc" >&2; exit 1; }
  grep -q "failed:" "$out/console.txt" && { echo "REHEARSAL FAILED: a benchmark row failed in $stage" >&2; exit 1; }
done
echo "REHEARSAL PASSED at $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
