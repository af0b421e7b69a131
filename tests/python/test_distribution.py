"""The CPU and CUDA distributions share the import name: a second one installed is explained."""

import warnings
from pathlib import Path

import pytest

import dino_rs
from dino_rs import _distribution


def _site(tmp_path: Path, *dists: str) -> str:
    for folder in dists:
        info = tmp_path / folder
        info.mkdir()
        name = folder.split("-")[0].replace("_", "-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    return str(tmp_path)


def test_one_distribution_is_quiet(tmp_path):
    site = _site(tmp_path, "dino_rs-0.1.0.dist-info")
    assert _distribution.installed([site]) == ["dino-rs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _distribution.warn_if_both("cpu", [site]) is None


@pytest.mark.parametrize("build, keep", [("cpu", "dino-rs"), ("cuda", "dino-rs-cu13")])
def test_both_distributions_warn_with_the_fix(tmp_path, build, keep):
    site = _site(tmp_path, "dino_rs-0.1.0.dist-info", "dino_rs_cu13-0.1.0.dist-info")
    assert _distribution.installed([site]) == ["dino-rs", "dino-rs-cu13"]
    with pytest.warns(RuntimeWarning, match="both dino-rs and dino-rs-cu13 are installed") as rec:
        _distribution.warn_if_both(build, [site])
    msg = str(rec[0].message)
    assert f"the {build} build" in msg
    assert msg.endswith(f"pip uninstall -y dino-rs dino-rs-cu13 && pip install {keep}")


def test_this_installation_has_one_distribution():
    # The package under test was installed one way; build_info says which build it is.
    assert len(_distribution.installed()) == 1
    assert dino_rs.build_info()["build"] in ("cpu", "cuda")
