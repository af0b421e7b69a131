#!/usr/bin/env bash
# The whole Python test suite against dino_rs as a user gets it: builds the sdist and the manylinux
# wheel (scripts/build_wheels.sh), installs the wheel with its test extras into a new virtual
# environment whose PATH has no cargo (nothing can quietly compile), and runs tests/python from a
# folder outside the repository, so that the source tree's python/ cannot stand in for the installed
# package. The stub check (tests/python/test_stubs.py) then checks the installed stubs too.
#
#   bash scripts/test_installed.sh              # build, install, test
#   DINO_RS_WHEEL=dist/dino_rs-....whl bash scripts/test_installed.sh   # test a wheel already built
#
# Extra arguments go to pytest (e.g. -k hub).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DINO_RS_TEST_VENV:-$ROOT/target/test-venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

WHEEL="${DINO_RS_WHEEL:-}"
if [ -z "$WHEEL" ]; then
  bash "$ROOT/scripts/build_wheels.sh"
  WHEEL="$(ls "$ROOT"/dist/dino_rs-*.whl)"
fi

# PATH without any folder that has cargo or rustc in it.
CLEAN_PATH="$(printf '%s\n' "${PATH//:/$'\n'}" | while IFS= read -r d; do
  [ -n "$d" ] && [ ! -x "$d/cargo" ] && [ ! -x "$d/rustc" ] && printf '%s:' "$d"; done)"
CLEAN_PATH="${CLEAN_PATH%:}"

rm -rf "$VENV"
python3 -m venv "$VENV"
run() { env -u CARGO_HOME -u RUSTUP_HOME PATH="$VENV/bin:$CLEAN_PATH" "$@"; }
run sh -c '! command -v cargo >/dev/null' || { echo "cargo is still on the test PATH" >&2; exit 1; }
run python -m pip install -q "$WHEEL[test]"

OUTSIDE="$(mktemp -d)"
trap 'rm -rf "$OUTSIDE"' EXIT
cd "$OUTSIDE"
run python - "$VENV" <<'PY'
import os, sys
import dino_rs
where = os.path.realpath(dino_rs.__file__)
print(f"dino_rs {dino_rs.__version__} from {where}; build_info {dino_rs.build_info()}")
if not where.startswith(os.path.realpath(sys.argv[1])):
    sys.exit(f"dino_rs was imported from {where}, not from the test environment {sys.argv[1]}")
PY
run python -m pytest "$ROOT/tests/python" -q -p no:cacheprovider "$@"
