"""examples/pretrained_features.ipynb runs from top to bottom (nbclient + ipykernel, the `test` extra)
as on a user's machine, except that the internet is a loopback server in this process.

The notebook's own line, ``dr.from_pretrained(MODEL)``, downloads into an empty DINO_RS_HOME. The
kernel is another process, so the test cannot monkeypatch ``dino_rs.pretrained._MODELS`` there; it
appends to the notebook's parameter cell instead (as papermill would): a registry entry for the
small random-weight DINOv2 fixture (embed_dim 24, depth 2, 4 registers: no published model has that
architecture) whose URL is the loopback server, and ``MODEL`` set to its name. Every proxy variable
points at the loopback server too, so any other request the notebook made would be recorded there
(or fail) instead of reaching the internet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loopback import Loopback
from test_notebook import user_machine

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "pretrained_features.ipynb"
FIXTURES = REPO / "tests" / "fixtures" / "pretrained"
CASE = "dinov2_reg_mlp"
PATH = "/dinov2/tiny_reg/tiny_reg4_pretrain.pth"


def read():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[test]')")
    return nbformat, nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_nbformat4():
    nbformat, nb = read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert 'MODEL = "dinov2_vits14"' in code[0].source
    assert all(not c.outputs for c in code), "commit the notebook without outputs"
    assert any("dr.from_pretrained(MODEL" in c.source for c in code)


@pytest.fixture
def server():
    lb = Loopback()
    yield lb
    lb.close()


def test_pretrained_notebook_executes(tmp_path, server):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install '.[test]')")
    pytest.importorskip("sklearn")
    nbformat, nb = read()

    url = server.serve(PATH, (FIXTURES / f"{CASE}.official.pth").read_bytes())
    arch = json.loads((FIXTURES / "manifest.json").read_text())["cases"][CASE]["architecture"]
    entry = dict(name="tiny_reg", url=url, family=arch["family"], embed_dim=arch["embed_dim"],
                 depth=arch["depth"], num_heads=arch["num_heads"], patch_size=arch["patch_size"],
                 img_size=arch["img_size"], num_register_tokens=arch["num_register_tokens"])
    params = next(c for c in nb.cells if c.cell_type == "code")
    params.source += (
        "\n# Injected by tests/python/test_pretrained_notebook.py\n"
        "import dino_rs.pretrained as _pretrained\n"
        f"_pretrained._MODELS['tiny_reg'] = _pretrained.PretrainedModel(**{entry!r})\n"
        "MODEL = 'tiny_reg'\n"
        "N_TRAIN, N_TEST = 60, 30\n"
    )

    env = user_machine(tmp_path)
    del env["DINO_RS_OFFLINE"]  # the download is the point; the proxies below keep it on loopback
    proxy = server.url("").rstrip("/")
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[var] = proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0]["ename"] + ": " + errors[0]["evalue"]
    assert server.requests == [PATH], "one download, from the loopback server, and no other request"
    home = tmp_path / "dino_rs_home"
    cached = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert cached == ["checkpoints/tiny_reg4_pretrain.pth"]

    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "dinov2_vits14" in text and "dinov2, 4 register tokens" in text
    assert "60 + 30 images (28, 28) uint8 -> (48,) float32" in text
    for name, dim in (("raw pixels", 784), ('features="cls"', 24), ('features="cls+avgpool"', 48)):
        line = next(l for l in text.splitlines() if l.startswith(name))
        assert f"{dim}-d" in line and "k-NN top-1" in line and "linear probe" in line, line
    assert "patch features (4, 256, 24) -> grid (4, 16, 16, 24)" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 3  # attention maps, thresholded masks, patch PCA
