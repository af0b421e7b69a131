"""Bad input raises specific exceptions naming the problem; nothing crashes or hangs."""

from __future__ import annotations

import errno
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import dino_rs
from conftest import SMALL


def small_aug(**kw) -> dino_rs.MultiCropAugmenter:
    return dino_rs.MultiCropAugmenter(**{**SMALL, **kw})


def check_image_error(err: BaseException, path, *words: str) -> None:
    """An ImageError naming `path` (in str() and .filename) whose message mentions one of `words`."""
    assert type(err) is dino_rs.ImageError
    assert isinstance(err, OSError)
    assert err.filename == str(path)
    message = str(err)
    assert message == f"{path}: {err.strerror}", message
    if words:
        assert any(w.lower() in message.lower() for w in words), (words, message)


@pytest.fixture
def bad_files(tmp_path, photo) -> dict:
    data = open(photo, "rb").read()
    assert data[:2] == b"\xff\xd8"
    rng = np.random.default_rng(1)
    files = {
        "random_bytes": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), ("not a recognised", "corrupt")),
        "jpeg_header_then_garbage": (
            data[:2] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            ("corrupt", "not a supported", "not a recognised"),
        ),
        "header_only": (data[:600], ("corrupt", "truncated")),
        "empty": (b"", ("empty", "0 bytes")),
        "text": (b"this is a text file, not a picture\n" * 20, ("not a recognised", "not a supported")),
    }
    out = {}
    for name, (content, words) in files.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(content)
        out[name] = (path, words)
    return out


def test_image_error_is_an_oserror():
    assert issubclass(dino_rs.ImageError, OSError)
    assert dino_rs.ImageError.__module__ == "dino_rs._errors"


@pytest.mark.parametrize(
    "name", ["random_bytes", "jpeg_header_then_garbage", "header_only", "empty", "text"]
)
def test_unreadable_file_raises_image_error(bad_files, name):
    path, words = bad_files[name]
    aug = small_aug()
    for arg in (str(path), path):
        with pytest.raises(dino_rs.ImageError) as info:
            aug(arg, seed=0)
        check_image_error(info.value, path, *words)
    with pytest.raises(dino_rs.ImageError) as info:
        aug.batch([path], seed=0)
    check_image_error(info.value, path, *words)


@pytest.mark.parametrize("name", ["random_bytes", "empty"])
def test_image_error_str_describes_the_problem(bad_files, name):
    """str(e) is what a traceback shows: it must say what is wrong, not just '[Errno None] None'."""
    path, words = bad_files[name]
    with pytest.raises(dino_rs.ImageError) as info:
        small_aug()(path, seed=0)
    text = str(info.value)
    assert "None: " not in text, text
    assert any(w.lower() in text.lower() for w in words), text


def test_truncated_jpeg_raises_image_error(tmp_path, photo):
    """The first half of a real JPEG: PIL refuses it ('image file is truncated'); so must we, rather
    than returning an image whose bottom half is invented grey."""
    data = open(photo, "rb").read()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im, pytest.raises(OSError):
        im.load()
    with pytest.raises(dino_rs.ImageError) as info:
        small_aug()(path, seed=0)
    check_image_error(info.value, path, "truncated", "corrupt")


def test_truncated_png_raises_image_error(tmp_path, photo_rgb):
    full = tmp_path / "full.png"
    Image.fromarray(photo_rgb).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dino_rs.ImageError) as info:
        small_aug()(path, seed=0)
    check_image_error(info.value, path, "truncated", "corrupt")


def test_image_folder_getitem_raises_image_error(tmp_path, bad_files, photo_rgb):
    root = tmp_path / "folder"
    root.mkdir()
    Image.fromarray(photo_rgb).save(root / "a_good.png")
    bad = root / "b_bad.jpg"
    shutil.copy(bad_files["text"][0], bad)
    ds = dino_rs.ImageFolder(root)
    assert len(ds) == 2
    assert ds[0][0].shape == photo_rgb.shape
    with pytest.raises(dino_rs.ImageError) as info:
        ds[1]
    check_image_error(info.value, bad, "not a recognised")


def test_batch_names_the_bad_file_among_good_ones(bad_files, png_photo):
    path, words = bad_files["random_bytes"]
    with pytest.raises(dino_rs.ImageError) as info:
        small_aug().batch([png_photo, path, png_photo], seed=0)
    check_image_error(info.value, path, *words)


def test_missing_file_raises_file_not_found(tmp_path, png_photo):
    missing = tmp_path / "does_not_exist.jpg"
    aug = small_aug()
    with pytest.raises(FileNotFoundError) as info:
        aug(missing, seed=0)
    assert not isinstance(info.value, dino_rs.ImageError)
    assert info.value.filename == str(missing)
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        aug.batch([png_photo, str(missing)], seed=0)


def test_decompression_bomb_refused(photo):
    aug = dino_rs.MultiCropAugmenter(max_pixels=1000)
    with pytest.raises(dino_rs.ImageError) as info:
        aug(photo, seed=0)
    check_image_error(info.value, photo, "max_pixels")
    assert "max_pixels" in str(info.value)
    assert "187500" in str(info.value)  # 500 x 375


def test_max_pixels_limit_is_inclusive_and_also_applies_to_folders(tmp_path, photo):
    assert len(dino_rs.MultiCropAugmenter(**SMALL, max_pixels=500 * 375)(photo, seed=0)) == 5
    with pytest.raises(dino_rs.ImageError):
        dino_rs.MultiCropAugmenter(**SMALL, max_pixels=500 * 375 - 1)(photo, seed=0)
    shutil.copy(photo, tmp_path)
    ds = dino_rs.ImageFolder(tmp_path, max_pixels=1000)
    with pytest.raises(dino_rs.ImageError) as info:
        ds[0]
    check_image_error(info.value, ds.paths[0], "max_pixels")
    # Arrays already in memory are not files: no limit applies to them.
    assert len(dino_rs.MultiCropAugmenter(**SMALL, max_pixels=10)(np.zeros((20, 20, 3), np.uint8))) == 5


# ---------------------------------------------------------------- arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16, np.int8, np.bool_])
def test_wrong_dtype_raises_value_error(dtype):
    arr = np.zeros((8, 8, 3), dtype)
    aug = small_aug()
    with pytest.raises(ValueError, match="dtype") as info:
        aug(arr, seed=0)
    assert "uint8" in str(info.value)
    assert np.dtype(dtype).name in str(info.value)
    with pytest.raises(ValueError, match="dtype"):
        aug.batch(np.zeros((2, 8, 8, 3), dtype), seed=0)
    with pytest.raises(ValueError, match="dtype"):
        aug.batch([arr], seed=0)


@pytest.mark.parametrize(
    "shape, text",
    [((10,), "(10)"), ((1, 2, 3, 4, 5), "(1, 2, 3, 4, 5)"), ((8, 8, 4), "(8, 8, 4)"), ((8, 8, 2), "(8, 8, 2)")],
)
def test_wrong_image_shape_raises_value_error(shape, text):
    with pytest.raises(ValueError) as info:
        small_aug()(np.zeros(shape, np.uint8), seed=0)
    assert "shape" in str(info.value)
    assert text in str(info.value)


def test_zero_dimensional_array_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        small_aug()(np.uint8(3), seed=0)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0, 3), (0, 0)])
def test_empty_image_raises_value_error(shape):
    with pytest.raises(ValueError, match="at least one pixel"):
        small_aug()(np.zeros(shape, np.uint8), seed=0)


def test_wrong_batch_shapes_raise_value_error():
    aug = small_aug()
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 4\)"):
        aug.batch(np.zeros((2, 8, 8, 4), np.uint8), seed=0)
    with pytest.raises(ValueError, match="shape"):
        aug.batch(np.zeros((8, 8), np.uint8), seed=0)
    with pytest.raises(ValueError, match="single path"):
        aug.batch("one_path.jpg", seed=0)
    with pytest.raises(ValueError, match="at least one pixel"):
        aug.batch(np.zeros((2, 0, 8, 3), np.uint8), seed=0)


def test_non_image_objects_raise():
    aug = small_aug()
    with pytest.raises((ValueError, TypeError)):
        aug(None, seed=0)
    with pytest.raises((ValueError, TypeError)):
        aug({"not": "an image"}, seed=0)
    with pytest.raises((ValueError, TypeError)):
        aug.batch(42, seed=0)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(flip_p=-0.1), "flip_p"),
        (dict(flip_p=float("nan")), "flip_p"),
        (dict(color_jitter_p=1.5), "color_jitter_p"),
        (dict(grayscale_p=2.0), "grayscale_p"),
        (dict(solarize_p=-1.0), "solarize_p"),
        (dict(blur_p=(1.0, 0.1, 1.5)), "blur_p"),
        (dict(global_scale=(1.0, 0.4)), "global_scale"),
        (dict(global_scale=(0.4, 1.5)), "global_scale"),
        (dict(local_scale=(0.0, 0.4)), "local_scale"),
        (dict(ratio=(4 / 3, 3 / 4)), "ratio"),
        (dict(hue=0.7), "hue"),
        (dict(hue=-0.1), "hue"),
        (dict(brightness=-0.5), "brightness"),
        (dict(contrast=float("inf")), "contrast"),
        (dict(saturation=-1.0), "saturation"),
        (dict(std=(0.229, 0.0, 0.225)), "std"),
        (dict(std=(-1.0, 1.0, 1.0)), "std"),
        (dict(mean=(float("nan"), 0.0, 0.0)), "mean"),
        (dict(global_size=0), "global_size"),
        (dict(local_size=0), "local_size"),
        (dict(global_size=100_000), "global_size"),
        (dict(n_local=100_000), "n_local"),
        (dict(blur_sigma=(2.0, 0.1)), "blur_sigma"),
        (dict(blur_sigma=(-0.1, 2.0)), "blur_sigma"),
        (dict(max_pixels=0), "max_pixels"),
    ],
)
def test_out_of_range_parameter_raises_value_error(kwargs, name):
    with pytest.raises(ValueError) as info:
        dino_rs.MultiCropAugmenter(**kwargs)
    assert name in str(info.value)


def test_negative_unsigned_parameters_raise_overflow_error():
    for kw in (dict(n_local=-1), dict(global_size=-1), dict(local_size=-16), dict(max_pixels=-5)):
        with pytest.raises(OverflowError):
            dino_rs.MultiCropAugmenter(**kw)


def test_wrong_tuple_lengths_and_types_raise():
    with pytest.raises(ValueError, match="length 3"):
        dino_rs.MultiCropAugmenter(mean=(0.5, 0.5))
    with pytest.raises((TypeError, ValueError)):
        dino_rs.MultiCropAugmenter(blur_p=(0.5, 0.5))
    with pytest.raises(TypeError):
        dino_rs.MultiCropAugmenter(global_size="224")
    with pytest.raises(TypeError):
        dino_rs.MultiCropAugmenter(unknown_option=1)


def test_seed_must_be_unsigned(photo_rgb):
    aug = small_aug()
    with pytest.raises(OverflowError):
        aug(photo_rgb, seed=-1)
    with pytest.raises(OverflowError):
        aug(photo_rgb, seed=2**64)
    with pytest.raises(TypeError):
        aug(photo_rgb, seed="0")
    assert len(aug(photo_rgb, seed=2**64 - 1)) == 5


def test_set_num_threads_zero_raises():
    before = dino_rs.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        dino_rs.set_num_threads(0)
    with pytest.raises(OverflowError):
        dino_rs.set_num_threads(-2)
    assert dino_rs.get_num_threads() == before


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        dino_rs.ImageFolder(tmp_path)
    assert "no image" in str(info.value)
    assert info.value.filename == str(tmp_path)
    assert info.value.errno == errno.ENOENT and "[Errno 0]" not in str(info.value)


def test_image_folder_without_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hello")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(FileNotFoundError, match="no image"):
        dino_rs.ImageFolder(tmp_path)


def test_image_folder_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        dino_rs.ImageFolder(missing)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(missing)
    assert str(missing) in str(info.value)


def test_image_folder_on_a_file(png_photo):
    with pytest.raises(OSError) as info:
        dino_rs.ImageFolder(png_photo)
    assert not isinstance(info.value, FileNotFoundError)
    assert "not a directory" in str(info.value)
    assert str(png_photo) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_image_folder_symlink_loop_raises_without_hanging(tmp_path, photo_rgb):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photo_rgb).save(root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "loop")
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        dino_rs.ImageFolder(root)
    assert time.perf_counter() - start < 5.0
    assert "loop" in str(info.value)


def test_image_folder_broken_symlink_is_reported_or_skipped(tmp_path, photo_rgb):
    Image.fromarray(photo_rgb).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "b.png")
    try:
        ds = dino_rs.ImageFolder(tmp_path)
    except FileNotFoundError as e:
        assert "b.png" in str(e) or "gone.png" in str(e)
    else:
        assert [os.path.basename(p) for p in ds.paths] == ["a.png"]
