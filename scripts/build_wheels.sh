#!/usr/bin/env bash
# Builds what the CPU package ships, into dist/ (override with OUT_DIR):
#   * the sdist, dino_rs-<version>.tar.gz;
#   * an abi3 manylinux2014 (manylinux_2_17) x86_64 wheel, built from that sdist, so that the wheel
#     is also the proof that the sdist builds.
#
#   bash scripts/build_wheels.sh        # needs Rust and python3 (>= 3.9); fetches maturin, zig and
#                                       # auditwheel from PyPI into a build venv
#
# Why each step (docs/install.md, How the wheels are built):
#  * zig (PyPI's `ziglang`) as the C compiler and linker, through `maturin --zig`: the extension is
#    linked against glibc 2.17's symbol versions whatever the build machine's glibc, which is what
#    the manylinux2014 tag promises. A plain `maturin build` tags the wheel with the build host's
#    glibc, and older systems refuse it.
#  * `auditwheel show` then checks the tag from the binary itself (the symbol versions it needs and
#    the libraries it links), not from what maturin was asked for; the script fails if it disagrees.
#  * No `-C target-cpu`: the wheel runs on any x86-64. The hot loops pick AVX2 at run time
#    (src/simd.rs) and candle's gemm picks its kernels likewise, so the wheel keeps the speed of a
#    source build (`dino_rs.build_info()["cpu_features"]` says what was detected).
#  * The size limit (MAX_WHEEL_MB, 10 by default) fails the build rather than ship a wheel that
#    grew unnoticed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/dist}"
WORK="${DINO_RS_WHEEL_WORK:-$ROOT/target/wheels}"
MAX_WHEEL_MB="${MAX_WHEEL_MB:-10}"
# zig 0.17 and maturin 1.16 are the pair this script was written and checked with.
BUILD_REQS=("maturin>=1.7,<2" "ziglang>=0.13,<0.18" "auditwheel>=6,<7")
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}" PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$WORK"
VENV="$WORK/buildvenv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${BUILD_REQS[@]}"
PY="$VENV/bin/python"
# maturin finds zig as `python3 -m ziglang` through PATH: the build venv's python first.
export PATH="$VENV/bin:$PATH"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
echo "== sdist"
"$PY" -m maturin sdist --manifest-path "$ROOT/Cargo.toml" -o "$OUT_DIR"
SDIST="$(ls "$OUT_DIR"/dino_rs-*.tar.gz)"

echo "== wheel, built from $(basename "$SDIST")"
rm -rf "$WORK/sdist"
mkdir -p "$WORK/sdist"
tar -xzf "$SDIST" -C "$WORK/sdist"
SRC="$(ls -d "$WORK"/sdist/dino_rs-*/)"
# maturin writes every sdist entry with one fixed old time stamp: cargo, which compares times, would
# take a build of an earlier sdist in the same place (or its build script) for current.
find "$SRC" -exec touch {} +
# One target directory for every build from an unpacked sdist: the dependencies compile once.
CARGO_TARGET_DIR="$WORK/target" "$PY" -m maturin build --release --strip --zig \
    --compatibility manylinux2014 --manifest-path "$SRC/Cargo.toml" -o "$OUT_DIR"
WHEEL="$(ls "$OUT_DIR"/dino_rs-*.whl)"

echo "== auditwheel show"
"$PY" -m auditwheel show "$WHEEL" | tee "$WORK/auditwheel.txt"
tr -s ' \n' ' ' <"$WORK/auditwheel.txt" | grep -q '"manylinux_2_17_x86_64"' || {
  echo "auditwheel does not find $WHEEL consistent with manylinux_2_17_x86_64" >&2
  exit 1
}
case "$(basename "$WHEEL")" in
  dino_rs-*-cp39-abi3-*manylinux_2_17_x86_64*.whl) ;;
  *) echo "unexpected wheel tags: $(basename "$WHEEL")" >&2; exit 1 ;;
esac

"$PY" - "$WHEEL" "$SDIST" "$MAX_WHEEL_MB" <<'PY'
import os, sys
wheel, sdist, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
mb = lambda p: os.path.getsize(p) / 1e6  # noqa: E731
print(f"wheel {os.path.basename(wheel)}: {mb(wheel):.2f} MB (limit {limit:g} MB)")
print(f"sdist {os.path.basename(sdist)}: {mb(sdist):.2f} MB")
if mb(wheel) > limit:
    sys.exit(f"the wheel is over {limit:g} MB")
PY
