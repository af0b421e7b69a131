"""The package surface: exports, version, threads, CUDA flag, CLI demo, typing marker."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dino_rs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_all_names_exist():
    assert len(dino_rs.__all__) == len(set(dino_rs.__all__))
    for name in dino_rs.__all__:
        assert hasattr(dino_rs, name), name
    for name in (
        "MultiCropAugmenter",
        "ImageFolder",
        "ArrayDataset",
        "MultiCropLoader",
        "ImageError",
        "set_num_threads",
        "get_num_threads",
        "cuda_is_available",
        "bundled_photos",
        "__version__",
    ):
        assert name in dino_rs.__all__, name


def test_classes_live_in_dino_rs():
    for cls in (dino_rs.MultiCropAugmenter, dino_rs.ImageFolder, dino_rs.ArrayDataset, dino_rs.MultiCropLoader):
        assert isinstance(cls, type)
        assert cls.__module__ == "dino_rs"


def test_version():
    assert isinstance(dino_rs.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.\-+].*)?", dino_rs.__version__)
    assert dino_rs.__version__ == importlib.metadata.version("dino-rs")


def test_cuda_not_available_on_cpu_build():
    assert dino_rs.cuda_is_available() is False
    # The reason is kept, so that a GPU check can fail with it instead of skipping.
    assert "no CUDA support" in dino_rs.cuda_error()


def test_gpu_tests_fail_rather_than_skip_when_cuda_is_required(tmp_path):
    # scripts/gpu_check.sh sets DINO_RS_REQUIRE_CUDA=1: there a device that does not open must fail
    # tests/python/test_gpu.py, with the reason, instead of skipping every test and exiting 0.
    import os
    import subprocess
    import sys
    from pathlib import Path

    test_gpu = Path(__file__).with_name("test_gpu.py")
    run = lambda env: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pytest", str(test_gpu), "-q", "-p", "no:cacheprovider", "-x"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=300)
    required = run({"DINO_RS_REQUIRE_CUDA": "1"})
    assert required.returncode != 0, required.stdout
    assert "no CUDA support" in required.stdout, required.stdout
    optional = run({"DINO_RS_REQUIRE_CUDA": "0"})
    assert optional.returncode == 0 and "skipped" in optional.stdout, optional.stdout


def test_kernel_parity_on_the_cpu():
    # src/ops/parity.rs on the CPU: the fused kernels against the path other devices take (on a
    # GPU, tests/python/test_gpu.py runs it against CUDA).
    from dino_rs._dino_rs import _kernel_parity

    rows = _kernel_parity("cpu")
    assert all(error is None for _, _, error in rows), rows
    checks = {name: err for name, err, _ in rows}
    assert {"layer_norm.grad0", "dino_loss.grad0", "adamw.params", "ema", "clip", "upload_u8"} <= set(checks)
    assert all(err <= (2e-2 if ".bf16" in name else 1e-5) for name, err in checks.items()), checks
    with pytest.raises(ValueError, match="device must be"):
        _kernel_parity("tpu")


def test_num_threads_round_trip():
    before = dino_rs.get_num_threads()
    assert isinstance(before, int) and before >= 1
    try:
        for n in (1, 3, 2):
            dino_rs.set_num_threads(n)
            assert dino_rs.get_num_threads() == n
    finally:
        dino_rs.set_num_threads(before)
    assert dino_rs.get_num_threads() == before


def test_num_threads_env_variable():
    code = "import dino_rs; print(dino_rs.get_num_threads())"
    env = {**os.environ, "DINO_RS_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


STEP_READS = """
import numpy as np, dino_rs as dr
def reads():
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("syscr"))
m = dr.DINO(patch_size=8, img_size=16, embed_dim=32, depth=2, num_heads=2, out_dim=64, hidden_dim=32,
            bottleneck_dim=16, dtype="bfloat16", seed=0)
aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
loader = dr.MultiCropLoader(dr.ArrayDataset(np.zeros((2, 16, 16, 3), np.uint8)), aug, batch_size=2)
tr = dr.Trainer(m, loader, epochs=10, progress=False)
rng = np.random.default_rng(0)
g, lo = rng.standard_normal((2, 2, 3, 16, 16), np.float32), rng.standard_normal((2, 2, 3, 8, 8), np.float32)
tr.step(g, lo)
before = reads()
tr.step(g, lo)
print(reads() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's per-process I/O counters")
def test_a_cpu_bf16_step_reads_no_files():
    # The bfloat16 CPU path multiplies with candle, which re-read /proc/cpuinfo for every matmul
    # (~220 read calls in this step) unless RAYON_NUM_THREADS is set: dino_rs sets it on import.
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", STEP_READS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 20, f"{out.stdout.strip()} read calls in one step"


def test_bundled_photos():
    photos = dino_rs.bundled_photos()
    assert len(photos) == 4
    assert photos == sorted(photos)
    for p in photos:
        assert p.endswith(".jpg")
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.size == (500, 375)


def test_multicrop_grid_shape(photos):
    aug = dino_rs.MultiCropAugmenter(global_size=32, local_size=16, n_local=4)
    grid = dino_rs.multicrop_grid(photos[:2], aug, seed=0, pad=4)
    # width: pad + 2 (G + pad) + ceil(n_local / 2) (L + pad); height: pad + rows (max(G, 2L + pad) + pad)
    assert grid.shape == (4 + 2 * (36 + 4), 4 + 2 * 36 + 2 * 20, 3)
    assert grid.dtype == np.uint8
    assert (grid[:4] == 255).all()  # top padding is white
    assert grid[4:36, 4:36].std() > 5  # a real picture in the first global view


def test_demo_views_cli_writes_png(tmp_path):
    out = tmp_path / "views.png"
    result = subprocess.run(
        [sys.executable, "-m", "dino_rs", "demo", "--views", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and str(out) in result.stdout
    assert "4 photos -> 40 views" in result.stdout
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        # Defaults 224 / 96 / 8 locals, pad 4: width 4 + 2 * 228 + 4 * 100, height 4 + 4 * 228.
        assert im.size == (860, 916)
        arr = np.asarray(im)
    assert arr[4:228, 4:228].std() > 10


def test_demo_views_cli_with_images_and_bad_image(tmp_path, photos):
    out = tmp_path / "two.png"
    result = subprocess.run(
        [sys.executable, "-m", "dino_rs", "demo", "--views", "--output", str(out), "--images", photos[0], photos[1], "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as im:
        assert im.size == (860, 4 + 2 * 228)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    result = subprocess.run(
        [sys.executable, "-m", "dino_rs", "demo", "--views", "--output", str(tmp_path / "x.png"), "--images", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "dino-rs: error:" in result.stderr
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_demo_cli_requires_a_command():
    result = subprocess.run([sys.executable, "-m", "dino_rs"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "demo" in result.stderr


def test_py_typed_marker_installed():
    pkg = Path(dino_rs.__file__).parent
    assert (pkg / "py.typed").is_file()
    stub = pkg / "_dino_rs.pyi"
    if stub.exists():
        text = stub.read_text()
        for name in ("MultiCropAugmenter", "ImageFolder", "ArrayDataset", "MultiCropLoader"):
            assert f"class {name}" in text, name


def test_extension_module_is_compiled():
    ext = dino_rs._dino_rs
    assert Path(ext.__file__).suffix in (".so", ".pyd")


def test_build_info_says_which_build_is_installed():
    import dino_rs as dr

    info = dr.build_info()
    assert info["version"] == dr.__version__
    # A build without the cuda feature says so in cuda_error(); a CUDA build names what it targets.
    cpu_only = (dr.cuda_error() or "").startswith("this build of dino_rs has no CUDA support")
    assert info["build"] == ("cpu" if cpu_only else "cuda")
    if info["build"] == "cpu":
        assert info["cuda_version"] is None and info["cuda_compute_capability"] is None
    else:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]) and info["cuda_compute_capability"].isdigit()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if info["cpu_arch"] == "x86_64" and flags:
        for name in ("avx2", "avx512f"):
            assert info["cpu_features"][name] == (f" {name} " in flags.replace("\n", " ")), name
