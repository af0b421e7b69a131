"""Shared fixtures: real test images (from the bundled photos) written in many formats with Pillow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dino_rs

SMALL = dict(global_size=32, local_size=16, n_local=3)

# Every photometric transform switched off: the views are plain resized crops.
NO_PHOTOMETRICS = dict(
    flip_p=0.0,
    color_jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0, 0.0, 0.0),
    solarize_p=0.0,
)

# Identity normalisation: view * 255 gives back the pixel values.
IDENTITY_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def unnormalize(view: np.ndarray) -> np.ndarray:
    """A (3, S, S) view made with mean 0 / std 1 back to integer pixel values (int32)."""
    return np.rint(np.asarray(view, np.float64) * 255.0).astype(np.int32)


@pytest.fixture(scope="session")
def photos() -> list[str]:
    paths = dino_rs.bundled_photos()
    assert len(paths) == 4, paths
    for p in paths:
        assert os.path.isfile(p), p
    return paths


@pytest.fixture(scope="session")
def photo(photos) -> str:
    return photos[0]


@pytest.fixture(scope="session")
def photo_rgb(photo) -> np.ndarray:
    """The first photo as PIL decodes it, uint8 (H, W, 3), downsized to keep tests fast."""
    with Image.open(photo) as im:
        arr = np.asarray(im.convert("RGB").resize((100, 75), Image.BICUBIC))
    assert arr.shape == (75, 100, 3) and arr.dtype == np.uint8
    return arr


@pytest.fixture(scope="session")
def photo_arrays(photos) -> list[np.ndarray]:
    """All four photos, PIL-decoded and downsized to 80x60 (uint8 (60, 80, 3))."""
    out = []
    for p in photos:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((80, 60), Image.BICUBIC)))
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, photos) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def png_photo(image_dir, photo_rgb) -> Path:
    """A lossless copy of `photo_rgb`: decoding it must give exactly `photo_rgb`."""
    path = image_dir / "photo.png"
    Image.fromarray(photo_rgb).save(path)
    return path


@pytest.fixture(scope="session")
def format_files(image_dir, photos) -> dict[str, Path]:
    """The same photo (downsized) as JPEG, PNG, BMP, WebP (lossless), TIFF and GIF."""
    with Image.open(photos[1]) as im:
        rgb = im.convert("RGB").resize((125, 94), Image.BICUBIC)
    files = {
        "jpeg": ("photo.jpg", dict(format="JPEG", quality=95)),
        "png": ("photo.png", dict(format="PNG")),
        "bmp": ("photo.bmp", dict(format="BMP")),
        "webp": ("photo.webp", dict(format="WEBP", lossless=True)),
        "tiff": ("photo.tiff", dict(format="TIFF")),
        "gif": ("photo.gif", dict(format="GIF")),
    }
    out = {}
    d = image_dir / "formats"
    d.mkdir()
    for name, (fname, kw) in files.items():
        path = d / fname
        rgb.save(path, **kw)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def special_files(image_dir, photos) -> dict[str, Path]:
    """Images in modes that must be converted to RGB: grey, RGBA, 16-bit, palette+transparency,
    EXIF-rotated JPEG and CMYK JPEG."""
    d = image_dir / "special"
    d.mkdir()
    with Image.open(photos[2]) as im:
        rgb = im.convert("RGB").resize((90, 60), Image.BICUBIC)
    out = {}

    path = d / "gray.png"
    rgb.convert("L").save(path)
    out["gray"] = path

    path = d / "rgba.png"
    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(path)
    out["rgba"] = path

    # 16-bit grey: values v * 257 so that a 16 -> 8 bit scaling gives back exactly v.
    path = d / "gray16.png"
    gray8 = np.asarray(rgb.convert("L"))
    im16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert im16.mode == "I;16", im16.mode
    im16.save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    out["gray16"] = path
    out["gray16_values"] = gray8

    path = d / "palette.png"
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out["palette"] = path

    # EXIF orientation 6: the stored pixels must be rotated 90 degrees clockwise for display.
    path = d / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6
        assert check.size == (90, 60)
    out["exif_rotated"] = path

    path = d / "cmyk.jpg"
    rgb.convert("CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out["cmyk"] = path
    return out


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def folder_tree(tmp_path, photo_arrays) -> Path:
    """root/zebra/{a.png, b.jpg, deep/c.bmp}, root/ant/{d.png, e.webp}, root/readme.txt.

    Two classes, created in non-sorted order; one image nested a level deeper (recursive scan).
    """
    root = tmp_path / "tree"
    a, b, c, d = photo_arrays
    _write(root / "zebra" / "a.png", a)
    _write(root / "zebra" / "b.jpg", b)
    _write(root / "zebra" / "deep" / "c.bmp", c)
    _write(root / "ant" / "d.png", d)
    (root / "ant").mkdir(exist_ok=True)
    Image.fromarray(a).save(root / "ant" / "e.webp", lossless=True)
    (root / "readme.txt").write_text("not an image\n")
    (root / "zebra" / "notes.csv").write_text("1,2,3\n")
    return root


@pytest.fixture
def corrupt_jpeg(tmp_path) -> Path:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path
