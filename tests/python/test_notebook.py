"""examples/quickstart.ipynb runs from top to bottom (nbclient + ipykernel, the `test` extra) as on
a user's machine: no system copy of Fashion-MNIST, an empty cache and downloads forbidden, so that
anything the notebook would fetch fails the test instead of being found on the CI machine."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def user_machine(tmp_path: Path) -> dict:
    """The notebook kernel's environment: a fresh DINO_RS_HOME, no Debian data, no downloads."""
    env = {k: v for k, v in os.environ.items() if k != "FASHION_MNIST_ROOT"}
    env.update(
        DINO_RS_IGNORE_SYSTEM_DATA="1",
        DINO_RS_HOME=str(tmp_path / "dino_rs_home"),
        DINO_RS_OFFLINE="1",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    return env


def execute(nb, tmp_path: Path, env: dict) -> list:
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install '.[test]')")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_notebook_is_valid_nbformat4():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])  # the knobs come first
    assert all(not c.outputs for c in code), "commit the notebook without outputs"


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = execute(nb, tmp_path, user_machine(tmp_path))
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "(512, 28, 28) uint8 classes:" in text  # the bundled subset, cut to N_TRAIN
    assert "k-NN top-1" in text and "linear probe" in text and "pipeline accuracy" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4  # views, history, two attention figures
    assert not (tmp_path / "dino_rs_home").exists()  # nothing was downloaded or cached


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes())


def run_data_cells(tmp_path: Path, data: str, env: dict) -> str:
    """Runs the notebook up to its "other data" cell with ``DATA = data``; the cell's printed line."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    last = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and 'elif DATA != "demo"' in c.source)
    nb.cells = nb.cells[: last + 1]
    params = next(c for c in nb.cells if c.cell_type == "code")
    params.source += f"\nDATA = {data!r}\nN_TRAIN, N_TEST = 100, 100\n"
    outputs = execute(nb, tmp_path, env)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0]["ename"] + ": " + errors[0]["evalue"]
    return outputs[-1]["text"]


def test_the_full_dataset_switch(tmp_path):
    # Fashion-MNIST where a user may keep it ($FASHION_MNIST_ROOT), here 8 + 4 synthetic images.
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for prefix, n in (("train", 8), ("t10k", 4)):
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(np.zeros((n, 28, 28), np.uint8)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(np.arange(n, dtype=np.uint8)))
    env = dict(user_machine(tmp_path), FASHION_MNIST_ROOT=str(root))
    assert run_data_cells(tmp_path, "full", env).startswith("(8, 28, 28) uint8 classes: ('T-shirt/top'")


def test_the_image_folder_switch(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    for name, value in (("dark", 40), ("bright", 210)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            pixels = np.clip(rng.normal(value, 20, (40, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    text = run_data_cells(tmp_path, str(tmp_path / "images"), user_machine(tmp_path))
    assert text.strip() == "(8, 28, 28) uint8 classes: ['bright', 'dark']"
