"""dino_rs.ImageFolder, dino_rs.ArrayDataset and dino_rs.MultiCropLoader."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import dino_rs
from conftest import IDENTITY_NORM, NO_PHOTOMETRICS, SMALL, unnormalize


def small_aug(**kw) -> dino_rs.MultiCropAugmenter:
    return dino_rs.MultiCropAugmenter(**{**SMALL, **kw})


def plain_aug() -> dino_rs.MultiCropAugmenter:
    """Crops only, identity normalisation: a constant-colour image's views read back its colour."""
    return small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)


def coloured_dataset(n: int, labels=None) -> dino_rs.ArrayDataset:
    """Image i (n <= 25) is constant: red = 10 * i + 5, green = 250 - 10 * i, blue = 7."""
    assert n <= 25
    imgs = np.zeros((n, 12, 10, 3), np.uint8)
    for i in range(n):
        imgs[i] = (10 * i + 5, 250 - 10 * i, 7)
    return dino_rs.ArrayDataset(imgs, labels)


def batch_ids(g: np.ndarray, l: np.ndarray) -> list[int]:
    """The image index of each batch element, checked consistent across all of its views."""
    ids = []
    for b in range(g.shape[1]):
        red = unnormalize(g[0, b, 0, 0, 0].reshape(1))[0]
        assert (red - 5) % 10 == 0, red
        i = (red - 5) // 10
        for views in (g, l):
            u = unnormalize(views[:, b])
            assert (u[:, 0] == 10 * i + 5).all()
            assert (u[:, 1] == 250 - 10 * i).all()
            assert (u[:, 2] == 7).all()
        ids.append(int(i))
    return ids


def epoch_ids(loader) -> list[list[int]]:
    return [batch_ids(g, l) for g, l in loader]


def loader_threads() -> int:
    """Native threads of this process named like the loader's producer thread."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip().startswith("dino-rs-loader"):
                    n += 1
        except OSError:
            pass
    return n


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_scan(folder_tree):
    ds = dino_rs.ImageFolder(folder_tree)
    assert ds.classes == ["ant", "zebra"]
    rel = [os.path.relpath(p, folder_tree) for p in ds.paths]
    assert sorted(rel) == sorted(
        [
            os.path.join("ant", "d.png"),
            os.path.join("ant", "e.webp"),
            os.path.join("zebra", "a.png"),
            os.path.join("zebra", "b.jpg"),
            os.path.join("zebra", "deep", "c.bmp"),
        ]
    )
    assert len(ds) == 5
    assert isinstance(ds.labels, np.ndarray)
    assert ds.labels.dtype == np.int64
    assert ds.labels.shape == (5,)
    expected = {"ant": 0, "zebra": 1}
    for path, label in zip(ds.paths, ds.labels):
        assert os.path.isabs(path) or path.startswith(str(folder_tree))
        assert label == expected[Path(os.path.relpath(path, folder_tree)).parts[0]]
    assert os.path.samefile(ds.root, folder_tree)
    assert "ImageFolder(" in repr(ds) and "images=5" in repr(ds) and "classes=2" in repr(ds)


def test_image_folder_order_is_sorted_and_deterministic(folder_tree):
    a = dino_rs.ImageFolder(folder_tree)
    b = dino_rs.ImageFolder(str(folder_tree))
    assert a.paths == b.paths
    assert a.paths == sorted(a.paths)
    assert a.labels.tolist() == [0, 0, 1, 1, 1]


def test_image_folder_getitem(folder_tree, photo_arrays):
    ds = dino_rs.ImageFolder(folder_tree)
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, np.ndarray)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape == (60, 80, 3)
        assert isinstance(label, int) and label == ds.labels[i]
        with Image.open(ds.paths[i]) as im:
            ref = np.asarray(im.convert("RGB"))
        tol = 4 if ds.paths[i].endswith(".jpg") else 0
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= tol, ds.paths[i]
    # Lossless files give back exactly what was written.
    idx = [os.path.basename(p) for p in ds.paths].index("d.png")
    assert np.array_equal(ds[idx][0], photo_arrays[3])


def test_image_folder_negative_index_and_index_error(folder_tree):
    ds = dino_rs.ImageFolder(folder_tree)
    n = len(ds)
    last, label = ds[-1]
    assert np.array_equal(last, ds[n - 1][0]) and label == ds.labels[-1]
    assert np.array_equal(ds[-n][0], ds[0][0])
    for bad in (n, n + 10, -n - 1):
        with pytest.raises(IndexError):
            ds[bad]
    # Iteration via __getitem__ stops at IndexError.
    assert len([item for item in ds]) == n


def test_images_in_root_are_unlabelled(tmp_path, photo_arrays):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(photo_arrays[0]).save(root / "loose.png")
    (root / "cls").mkdir()
    Image.fromarray(photo_arrays[1]).save(root / "cls" / "x.png")
    ds = dino_rs.ImageFolder(root)
    assert ds.classes == ["cls"]
    names = [os.path.basename(p) for p in ds.paths]
    labels = dict(zip(names, ds.labels.tolist()))
    assert labels == {"loose.png": -1, "x.png": 0}
    assert ds[names.index("loose.png")][1] == -1


def test_image_folder_flat_directory_has_no_classes(tmp_path, photo_arrays):
    for i, arr in enumerate(photo_arrays):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    ds = dino_rs.ImageFolder(tmp_path)
    assert ds.classes == []
    assert ds.labels.tolist() == [-1, -1, -1, -1]


def test_image_folder_extensions_case_insensitive(tmp_path, photo_arrays):
    Image.fromarray(photo_arrays[0]).save(tmp_path / "UPPER.PNG", format="PNG")
    Image.fromarray(photo_arrays[1]).save(tmp_path / "mixed.JpEg", format="JPEG")
    (tmp_path / "data.npy").write_bytes(b"\x93NUMPY")
    ds = dino_rs.ImageFolder(tmp_path)
    assert sorted(os.path.basename(p) for p in ds.paths) == ["UPPER.PNG", "mixed.JpEg"]


@pytest.mark.parametrize("fmt", ["png", "bmp", "webp", "tiff", "gif"])
def test_lossless_formats_match_pil(tmp_path, format_files, fmt):
    shutil.copy(format_files[fmt], tmp_path)
    ds = dino_rs.ImageFolder(tmp_path)
    img, label = ds[0]
    with Image.open(format_files[fmt]) as im:
        ref = np.asarray(im.convert("RGB"))
    assert img.shape == ref.shape == (94, 125, 3)
    assert np.array_equal(img, ref)
    assert label == -1


def test_jpeg_matches_pil_closely(tmp_path, format_files):
    shutil.copy(format_files["jpeg"], tmp_path)
    img, _ = dino_rs.ImageFolder(tmp_path)[0]
    with Image.open(format_files["jpeg"]) as im:
        ref = np.asarray(im.convert("RGB"))
    assert img.shape == ref.shape
    diff = np.abs(img.astype(int) - ref.astype(int))
    assert diff.max() <= 4 and diff.mean() < 1.0


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette"])
def test_modes_convert_to_rgb_like_pil(tmp_path, special_files, kind):
    """grey -> replicated, RGBA -> alpha dropped, palette+transparency -> palette colours."""
    shutil.copy(special_files[kind], tmp_path)
    img, _ = dino_rs.ImageFolder(tmp_path)[0]
    with Image.open(special_files[kind]) as im:
        assert im.mode in {"gray": ("L",), "rgba": ("RGBA",), "palette": ("P",)}[kind]
        ref = np.asarray(im.convert("RGB"))
    assert img.dtype == np.uint8 and img.shape == ref.shape == (60, 90, 3)
    assert np.array_equal(img, ref)


def test_16bit_png_scaled_to_8bit(tmp_path, special_files):
    shutil.copy(special_files["gray16"], tmp_path)
    img, _ = dino_rs.ImageFolder(tmp_path)[0]
    expected = special_files["gray16_values"]
    assert img.shape == (60, 90, 3) and img.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(img[:, :, c], expected)


def test_exif_orientation_is_applied(tmp_path, special_files):
    path = special_files["exif_rotated"]
    shutil.copy(path, tmp_path)
    img, _ = dino_rs.ImageFolder(tmp_path)[0]
    with Image.open(path) as im:
        assert im.size == (90, 60)  # stored landscape
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        stored = np.asarray(im.convert("RGB"))
    assert ref.shape == (90, 60, 3)
    assert img.shape == (90, 60, 3)  # displayed portrait
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 1.5
    # Orientation 6 = rotate 90 degrees clockwise.
    assert np.abs(img.astype(int) - np.rot90(stored, k=-1).astype(int)).mean() < 1.5


def test_cmyk_jpeg_converted_to_rgb(tmp_path, special_files):
    path = special_files["cmyk"]
    shutil.copy(path, tmp_path)
    img, _ = dino_rs.ImageFolder(tmp_path)[0]
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    assert img.shape == ref.shape == (60, 90, 3)
    diff = np.abs(img.astype(int) - ref.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16


def test_all_special_files_augment(special_files):
    aug = small_aug()
    for kind, path in special_files.items():
        if kind.endswith("_values"):
            continue
        views = aug(path, seed=0)
        assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3, kind


# ---------------------------------------------------------------- ArrayDataset


def test_array_dataset_rgb(photo_arrays):
    arr = np.stack(photo_arrays)
    ds = dino_rs.ArrayDataset(arr)
    assert len(ds) == 4
    assert ds.shape == (4, 60, 80, 3)
    assert ds.labels is None
    for i in range(4):
        img, label = ds[i]
        assert img.dtype == np.uint8 and img.shape == (60, 80, 3)
        assert np.array_equal(img, arr[i])
        assert label == -1
    assert np.array_equal(ds[-1][0], arr[3])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds[-5]
    assert "ArrayDataset(" in repr(ds) and "images=4" in repr(ds)


def test_array_dataset_gray(photo_arrays):
    gray = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in photo_arrays])
    assert gray.shape == (4, 60, 80)
    ds = dino_rs.ArrayDataset(gray)
    assert len(ds) == 4
    img, _ = ds[2]
    assert img.shape == (60, 80, 3)
    for c in range(3):
        assert np.array_equal(img[:, :, c], gray[2])


def test_array_dataset_labels(photo_arrays):
    arr = np.stack(photo_arrays)
    ds = dino_rs.ArrayDataset(arr, labels=[3, 1, 4, 1])
    assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [3, 1, 4, 1]
    assert [ds[i][1] for i in range(4)] == [3, 1, 4, 1]
    ds = dino_rs.ArrayDataset(arr, labels=np.array([0, 1, 2, 3], np.int64))
    assert ds.labels.tolist() == [0, 1, 2, 3]


def test_array_dataset_copies_input(photo_arrays):
    arr = np.stack(photo_arrays)
    ds = dino_rs.ArrayDataset(arr)
    original = arr[0].copy()
    arr[0] = 0
    assert np.array_equal(ds[0][0], original)


def test_array_dataset_fortran_order_same_as_c_order(photo_arrays):
    arr = np.stack(photo_arrays)
    f = np.asfortranarray(arr)
    assert f.flags["F_CONTIGUOUS"] and not f.flags["C_CONTIGUOUS"]
    ds = dino_rs.ArrayDataset(f)
    for i in range(4):
        assert np.array_equal(ds[i][0], arr[i]), i


def test_array_dataset_non_contiguous_view(photo_arrays):
    arr = np.stack(photo_arrays)
    view = arr[::-1, ::2, ::-1]
    ds = dino_rs.ArrayDataset(view)
    assert ds.shape == (4, 30, 80, 3)
    for i in range(4):
        assert np.array_equal(ds[i][0], view[i])


def test_array_dataset_bad_inputs(photo_arrays):
    arr = np.stack(photo_arrays)
    with pytest.raises(ValueError, match="labels"):
        dino_rs.ArrayDataset(arr, labels=[1, 2])
    with pytest.raises(ValueError, match="uint8"):
        dino_rs.ArrayDataset(arr.astype(np.float32))
    with pytest.raises(ValueError):
        dino_rs.ArrayDataset(arr[0, :, :, 0])  # 2-D
    with pytest.raises(ValueError):
        dino_rs.ArrayDataset(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="N=0|at least one"):
        dino_rs.ArrayDataset(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError):
        dino_rs.ArrayDataset([arr[0], arr[1]])


# ---------------------------------------------------------------- MultiCropLoader


def test_loader_len():
    ds = coloured_dataset(10)
    aug = plain_aug()
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=4, drop_last=True)) == 2
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=4, drop_last=False)) == 3
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=5, drop_last=True)) == 2
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=5, drop_last=False)) == 2
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=10, drop_last=True)) == 1
    assert len(dino_rs.MultiCropLoader(ds, aug, batch_size=64, drop_last=False)) == 1


def test_loader_batch_shapes_drop_last():
    loader = dino_rs.MultiCropLoader(coloured_dataset(10), small_aug(), batch_size=4, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    for g, l in batches:
        assert g.shape == (2, 4, 3, 32, 32) and g.dtype == np.float32
        assert l.shape == (3, 4, 3, 16, 16) and l.dtype == np.float32


def test_loader_partial_last_batch():
    loader = dino_rs.MultiCropLoader(coloured_dataset(10), plain_aug(), batch_size=4, drop_last=False)
    batches = list(loader)
    assert [g.shape[1] for g, _ in batches] == [4, 4, 2]
    assert [l.shape[1] for _, l in batches] == [4, 4, 2]
    g, l = batches[-1]
    assert g.shape == (2, 2, 3, 32, 32) and l.shape == (3, 2, 3, 16, 16)


def test_loader_visits_every_image_once_per_epoch():
    n = 23
    loader = dino_rs.MultiCropLoader(coloured_dataset(n), plain_aug(), batch_size=5, drop_last=False, seed=3)
    for _ in range(2):
        ids = [i for batch in epoch_ids(loader) for i in batch]
        assert sorted(ids) == list(range(n))
    # drop_last: the images of full batches only, each at most once.
    loader = dino_rs.MultiCropLoader(coloured_dataset(n), plain_aug(), batch_size=5, drop_last=True, seed=3)
    ids = [i for batch in epoch_ids(loader) for i in batch]
    assert len(ids) == 20 and len(set(ids)) == 20


def test_loader_accepts_image_folder_and_raw_array(folder_tree):
    aug = small_aug()
    folder = dino_rs.ImageFolder(folder_tree)
    loader = dino_rs.MultiCropLoader(folder, aug, batch_size=2, drop_last=False)
    assert [g.shape[1] for g, _ in loader] == [2, 2, 1]
    assert loader.dataset is folder
    assert loader.augmenter is aug
    assert loader.batch_size == 2
    raw = np.zeros((6, 8, 8, 3), np.uint8)
    assert len(list(dino_rs.MultiCropLoader(raw, aug, batch_size=3))) == 2
    with pytest.raises(TypeError):
        dino_rs.MultiCropLoader([raw[0], raw[1]], aug)
    r = repr(loader)
    assert "MultiCropLoader(" in r and "batch_size=2" in r and "batches=3" in r


def test_loader_reshuffles_every_epoch():
    loader = dino_rs.MultiCropLoader(coloured_dataset(20), plain_aug(), batch_size=5, shuffle=True, seed=0)
    e0 = epoch_ids(loader)
    e1 = epoch_ids(loader)
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(20))
    assert e0 != e1
    assert e0[0] != e1[0]
    assert sum(e0, []) != list(range(20))  # actually shuffled


def test_loader_without_shuffle_keeps_dataset_order():
    loader = dino_rs.MultiCropLoader(coloured_dataset(12), plain_aug(), batch_size=4, shuffle=False, seed=5)
    expected = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert epoch_ids(loader) == expected
    assert epoch_ids(loader) == expected


def test_loader_augmentations_differ_between_epochs(photo_arrays):
    ds = dino_rs.ArrayDataset(np.stack(photo_arrays))
    loader = dino_rs.MultiCropLoader(ds, small_aug(), batch_size=4, shuffle=False, seed=0)
    (g0, _), = list(loader)
    (g1, _), = list(loader)
    assert not np.array_equal(g0, g1)


def test_same_seed_same_batches_across_loaders(photo_arrays):
    ds = dino_rs.ArrayDataset(np.stack(photo_arrays * 2))

    def run(seed):
        loader = dino_rs.MultiCropLoader(ds, small_aug(), batch_size=3, drop_last=False, seed=seed)
        return [list(loader) for _ in range(2)]

    a, b, c = run(7), run(7), run(8)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb) == 3
        for (ga, la), (gb, lb) in zip(ea, eb):
            assert ga.tobytes() == gb.tobytes() and la.tobytes() == lb.tobytes()
    assert a[0][0][0].tobytes() != c[0][0][0].tobytes()


def test_loader_batch_matches_augmenter_batch(photo_arrays):
    """Loader batches are made by the same augmenter: same shapes, same value range."""
    ds = dino_rs.ArrayDataset(np.stack(photo_arrays))
    aug = small_aug()
    (g, l), = list(dino_rs.MultiCropLoader(ds, aug, batch_size=4, shuffle=False))
    ga, la = aug.batch(photo_arrays, seed=0)
    assert g.shape == ga.shape and l.shape == la.shape
    assert np.isfinite(g).all() and np.isfinite(l).all()


def test_break_mid_epoch_then_iterate_again():
    loader = dino_rs.MultiCropLoader(coloured_dataset(20), plain_aug(), batch_size=2, seed=1, prefetch=2)
    for i, (g, _) in enumerate(loader):
        assert g.shape[1] == 2
        if i == 1:
            break
    assert loader.epoch == 1
    batches = epoch_ids(loader)
    assert len(batches) == 10
    assert sorted(sum(batches, [])) == list(range(20))
    assert loader.epoch == 2


def test_epoch_property():
    loader = dino_rs.MultiCropLoader(coloured_dataset(12), plain_aug(), batch_size=4, seed=2)
    assert loader.epoch == 0
    epochs = [epoch_ids(loader) for _ in range(3)]
    assert loader.epoch == 3
    it = iter(loader)
    assert loader.epoch == 4
    it.close()
    # Setting it replays that epoch's order.
    loader.epoch = 1
    assert loader.epoch == 1
    assert epoch_ids(loader) == epochs[1]
    assert loader.epoch == 2
    other = dino_rs.MultiCropLoader(coloured_dataset(12), plain_aug(), batch_size=4, seed=2)
    other.epoch = 2
    assert epoch_ids(other) == epochs[2]


def test_epoch_set_reproduces_augmentations(photo_arrays):
    ds = dino_rs.ArrayDataset(np.stack(photo_arrays))
    a = dino_rs.MultiCropLoader(ds, small_aug(), batch_size=2, seed=4)
    list(a)
    second = list(a)
    b = dino_rs.MultiCropLoader(ds, small_aug(), batch_size=2, seed=4)
    b.epoch = 1
    for (ga, la), (gb, lb) in zip(second, list(b)):
        assert ga.tobytes() == gb.tobytes() and la.tobytes() == lb.tobytes()


def test_iterator_close_then_next_stops():
    loader = dino_rs.MultiCropLoader(coloured_dataset(12), plain_aug(), batch_size=2)
    it = iter(loader)
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    assert iter(it) is it


def test_deleting_iterator_mid_epoch_is_prompt_and_joins_threads(photo_arrays):
    aug = small_aug()
    ds = dino_rs.ArrayDataset(np.stack([np.asarray(Image.fromarray(a).resize((160, 120))) for a in photo_arrays] * 16))
    # Warm up: thread pool created, one full epoch done.
    list(dino_rs.MultiCropLoader(ds, aug, batch_size=16))
    gc.collect()
    py_threads = threading.active_count()
    native = loader_threads()
    assert native == 0

    loader = dino_rs.MultiCropLoader(ds, aug, batch_size=2, prefetch=2)
    it = iter(loader)
    g, l = next(it)
    assert g.shape == (2, 2, 3, 32, 32)
    assert loader_threads() == 1
    start = time.perf_counter()
    del it
    gc.collect()
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert threading.active_count() == py_threads
    assert loader_threads() == 0
    # The loader still works afterwards.
    assert len(list(loader)) == len(loader) == 32
    assert loader_threads() == 0


def test_abandoned_for_loop_releases_thread():
    loader = dino_rs.MultiCropLoader(coloured_dataset(24), plain_aug(), batch_size=2, prefetch=1)

    def consume_one():
        for g, _ in loader:
            return g.shape

    assert consume_one() == (2, 2, 3, 32, 32)
    gc.collect()
    deadline = time.time() + 5
    while loader_threads() and time.time() < deadline:
        time.sleep(0.01)
    assert loader_threads() == 0


def _folder_with_corrupt_file(tmp_path, photo_arrays, corrupt_jpeg) -> tuple[Path, Path]:
    root = tmp_path / "ds"
    root.mkdir()
    for i, arr in enumerate(photo_arrays):
        Image.fromarray(arr).save(root / f"good{i}.png")
    bad = root / "bad.jpg"
    shutil.copy(corrupt_jpeg, bad)
    return root, bad


def test_on_error_skip_warns_and_yields(tmp_path, photo_arrays, corrupt_jpeg):
    root, bad = _folder_with_corrupt_file(tmp_path, photo_arrays, corrupt_jpeg)
    ds = dino_rs.ImageFolder(root)
    assert len(ds) == 5
    loader = dino_rs.MultiCropLoader(ds, small_aug(), batch_size=2, drop_last=False, on_error="skip")
    assert len(loader) == 3
    with pytest.warns(UserWarning) as record:
        batches = list(loader)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "skipped 1 unreadable" in messages[0]
    assert "bad.jpg" in messages[0]
    assert sum(g.shape[1] for g, _ in batches) == 4
    assert [g.shape[1] for g, _ in batches] == [2, 2]


def test_on_error_skip_drop_last(tmp_path, photo_arrays, corrupt_jpeg):
    root, _ = _folder_with_corrupt_file(tmp_path, photo_arrays, corrupt_jpeg)
    loader = dino_rs.MultiCropLoader(
        dino_rs.ImageFolder(root), small_aug(), batch_size=3, drop_last=True, on_error="skip"
    )
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        batches = list(loader)
    assert [g.shape[1] for g, _ in batches] == [3]


def test_on_error_raise_names_the_file(tmp_path, photo_arrays, corrupt_jpeg):
    root, bad = _folder_with_corrupt_file(tmp_path, photo_arrays, corrupt_jpeg)
    loader = dino_rs.MultiCropLoader(dino_rs.ImageFolder(root), small_aug(), batch_size=5, drop_last=False)
    with pytest.raises(dino_rs.ImageError) as info:
        list(loader)
    assert str(bad) in str(info.value)
    assert info.value.filename == str(bad)
    assert isinstance(info.value, OSError)
    # Default is "raise" as well, and the loader can be iterated again (raising again).
    with pytest.raises(dino_rs.ImageError):
        list(loader)


def test_loader_invalid_arguments():
    ds = coloured_dataset(4)
    aug = plain_aug()
    with pytest.raises(ValueError, match="on_error"):
        dino_rs.MultiCropLoader(ds, aug, on_error="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        dino_rs.MultiCropLoader(ds, aug, batch_size=0)
    with pytest.raises(ValueError, match="prefetch"):
        dino_rs.MultiCropLoader(ds, aug, batch_size=2, prefetch=0)
    with pytest.raises(ValueError, match="batch_size=5"):
        dino_rs.MultiCropLoader(ds, aug, batch_size=5, drop_last=True)
    # Without drop_last one partial batch is fine.
    loader = dino_rs.MultiCropLoader(ds, aug, batch_size=5, drop_last=False)
    assert len(loader) == 1
    assert [g.shape[1] for g, _ in loader] == [4]
    with pytest.raises(TypeError):
        dino_rs.MultiCropLoader(ds, "not an augmenter")
