"""Bad input raises specific exceptions naming the problem; nothing crashes or hangs.

The kinds of bad input issue 6 lists (corrupt files, bad arrays, NaN crops, out-of-range parameters,
bad checkpoints, ...) are catalogued in test_catalogue.py; these are the cases beyond that list."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

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


def test_image_error_is_an_oserror():
    assert issubclass(dino_rs.ImageError, OSError)
    assert dino_rs.ImageError.__module__ == "dino_rs._errors"


def test_image_folder_getitem_raises_image_error(tmp_path, photo_rgb):
    root = tmp_path / "folder"
    root.mkdir()
    Image.fromarray(photo_rgb).save(root / "a_good.png")
    bad = root / "b_bad.jpg"
    bad.write_bytes(b"this is a text file, not a picture\n" * 20)
    ds = dino_rs.ImageFolder(root)
    assert len(ds) == 2
    assert ds[0][0].shape == photo_rgb.shape
    with pytest.raises(dino_rs.ImageError) as info:
        ds[1]
    check_image_error(info.value, bad, "not a recognised")


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


# ---------------------------------------------------------------- arrays and parameters


def test_non_image_objects_raise():
    aug = small_aug()
    with pytest.raises((ValueError, TypeError)):
        aug(None, seed=0)
    with pytest.raises((ValueError, TypeError)):
        aug({"not": "an image"}, seed=0)
    with pytest.raises((ValueError, TypeError)):
        aug.batch(42, seed=0)


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


def test_image_folder_broken_symlink_is_reported_or_skipped(tmp_path, photo_rgb):
    Image.fromarray(photo_rgb).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "b.png")
    try:
        ds = dino_rs.ImageFolder(tmp_path)
    except FileNotFoundError as e:
        assert "b.png" in str(e) or "gone.png" in str(e)
    else:
        assert [os.path.basename(p) for p in ds.paths] == ["a.png"]


def test_malformed_pth_raises_without_a_panic_message_on_stderr(capfd):
    # candle's pickle reader panics on this file (found by fuzzing); dino_rs catches the panic and
    # raises an error naming the file, and the panic's "thread ... panicked at" message must not
    # reach stderr beside it
    path = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz" / "checkpoint" / "pth_storage_tuple_without_numel.pth"
    with pytest.raises(ValueError, match="malformed pickle data") as e:
        dino_rs.load_backbone(path)
    assert path.name in str(e.value)
    assert "panicked" not in capfd.readouterr().err
