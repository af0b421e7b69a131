"""The type stubs of the extension (python/dino_rs/_dino_rs.pyi) agree with the compiled module.

The same check by hand, from any directory, against the installed package:
    python -m mypy.stubtest dino_rs._dino_rs
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_stubtest(tmp_path):
    pytest.importorskip("mypy.stubtest", reason="mypy is not installed (pip install '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "dino_rs._dino_rs", "--concise"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
