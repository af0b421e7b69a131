"""dino_rs.MultiCropAugmenter: defaults, shapes, determinism, inputs and each transform's effect."""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

import dino_rs
from conftest import IDENTITY_NORM, NO_PHOTOMETRICS, SMALL, unnormalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def small_aug(**kw) -> dino_rs.MultiCropAugmenter:
    return dino_rs.MultiCropAugmenter(**{**SMALL, **kw})


def assert_views_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert x.dtype == y.dtype == np.float32
        assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------- defaults and parameters


def test_default_params_are_the_official_dino_recipe():
    p = dino_rs.MultiCropAugmenter().get_params()
    expected = {
        "global_size": 224,
        "local_size": 96,
        "n_local": 8,
        "global_scale": (0.4, 1.0),
        "local_scale": (0.05, 0.4),
        "flip_p": 0.5,
        "color_jitter_p": 0.8,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
        "grayscale_p": 0.2,
        "blur_p": (1.0, 0.1, 0.5),
        "blur_sigma": (0.1, 2.0),
        "solarize_p": 0.2,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "ratio": (3 / 4, 4 / 3),
        "max_pixels": dino_rs.DEFAULT_MAX_PIXELS,
    }
    assert set(p) == set(expected)
    for key, value in expected.items():
        got = p[key]
        if isinstance(value, tuple):
            assert len(got) == len(value), key
            assert list(got) == pytest.approx(list(value), rel=1e-6), key
        elif isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-6), key
        else:
            assert got == value, key
            assert type(got) is int, key
    assert dino_rs.DEFAULT_MAX_PIXELS == 178_956_970


def test_default_properties():
    aug = dino_rs.MultiCropAugmenter()
    assert (aug.global_size, aug.local_size, aug.n_local, aug.n_views) == (224, 96, 8, 10)


def test_get_params_reflects_arguments_and_rebuilds_equal_augmenter(photo_rgb):
    kw = dict(
        global_size=40,
        local_size=24,
        n_local=5,
        global_scale=(0.5, 0.9),
        local_scale=(0.1, 0.3),
        flip_p=0.25,
        color_jitter_p=0.5,
        brightness=0.3,
        contrast=0.2,
        saturation=0.1,
        hue=0.05,
        grayscale_p=0.3,
        blur_p=(0.9, 0.2, 0.4),
        blur_sigma=(0.2, 1.5),
        solarize_p=0.6,
        mean=(0.5, 0.4, 0.3),
        std=(0.3, 0.2, 0.1),
        ratio=(0.5, 2.0),
        max_pixels=10**6,
    )
    aug = dino_rs.MultiCropAugmenter(**kw)
    p = aug.get_params()
    for key, value in kw.items():
        if isinstance(value, tuple):
            assert list(p[key]) == pytest.approx(list(value), rel=1e-6), key
        else:
            assert p[key] == pytest.approx(value, rel=1e-6), key
    rebuilt = dino_rs.MultiCropAugmenter(**p)
    assert rebuilt.get_params() == p
    assert_views_equal(aug(photo_rgb, seed=3), rebuilt(photo_rgb, seed=3))


def test_repr_names_sizes():
    r = repr(small_aug())
    assert r.startswith("MultiCropAugmenter(")
    assert "global_size=32" in r
    assert "local_size=16" in r
    assert "n_local=3" in r


def test_pickle_round_trip_keeps_params_and_output(photo_rgb):
    aug = small_aug(flip_p=0.3, hue=0.05, mean=(0.1, 0.2, 0.3), max_pixels=123456)
    clone = pickle.loads(pickle.dumps(aug))
    assert type(clone) is dino_rs.MultiCropAugmenter
    assert clone.get_params() == aug.get_params()
    assert clone.get_params()["max_pixels"] == 123456
    assert_views_equal(aug(photo_rgb, seed=11), clone(photo_rgb, seed=11))


# ---------------------------------------------------------------- shapes and dtypes


def test_call_shapes_dtypes_globals_first(photo_rgb):
    views = small_aug()(photo_rgb, seed=0)
    assert isinstance(views, list)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for v in views:
        assert v.dtype == np.float32
        assert v.flags["C_CONTIGUOUS"]
        assert np.isfinite(v).all()
        assert v.std() > 0.05  # a real photo, not a constant


def test_call_with_default_sizes(photo):
    views = dino_rs.MultiCropAugmenter()(photo, seed=0)
    assert [v.shape for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(v.dtype == np.float32 for v in views)
    # Normalised with ImageNet statistics: values stay within (0-0.485)/0.229 .. (1-0.406)/0.225.
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for v in views:
        assert v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5


def test_batch_shapes_dtypes(photo_arrays):
    g, l = small_aug().batch(photo_arrays, seed=0)
    assert g.shape == (2, 4, 3, 32, 32)
    assert l.shape == (3, 4, 3, 16, 16)
    assert g.dtype == np.float32 and l.dtype == np.float32
    assert np.isfinite(g).all() and np.isfinite(l).all()
    # Different images give different views.
    assert not np.array_equal(g[0, 0], g[0, 1])


def test_batch_with_zero_locals(photo_arrays):
    g, l = small_aug(n_local=0).batch(photo_arrays[:2], seed=0)
    assert g.shape == (2, 2, 3, 32, 32)
    assert l.shape == (0, 2, 3, 16, 16)
    assert [v.shape for v in small_aug(n_local=0)(photo_arrays[0], seed=0)] == [(3, 32, 32)] * 2


def test_call_view_equals_batch_view(photo_arrays):
    aug = small_aug()
    img = photo_arrays[1]
    for seed in (0, 7, 2**63 + 5):
        views = aug(img, seed=seed)
        g, l = aug.batch([img], seed=seed)
        for v in range(2):
            assert views[v].tobytes() == g[v, 0].tobytes(), (seed, v)
        for v in range(3):
            assert views[2 + v].tobytes() == l[v, 0].tobytes(), (seed, v)
    # And the first image of a larger batch too.
    views = aug(photo_arrays[0], seed=5)
    g, l = aug.batch(photo_arrays, seed=5)
    assert views[0].tobytes() == g[0, 0].tobytes()
    assert views[4].tobytes() == l[2, 0].tobytes()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes(photo_rgb, photo_arrays):
    aug = small_aug()
    assert_views_equal(aug(photo_rgb, seed=42), aug(photo_rgb, seed=42))
    g1, l1 = aug.batch(photo_arrays, seed=42)
    g2, l2 = aug.batch(photo_arrays, seed=42)
    assert g1.tobytes() == g2.tobytes() and l1.tobytes() == l2.tobytes()
    # A separate but equal augmenter gives the same too.
    g3, l3 = small_aug().batch(photo_arrays, seed=42)
    assert g1.tobytes() == g3.tobytes() and l1.tobytes() == l3.tobytes()


def test_different_seeds_differ(photo_rgb):
    aug = small_aug()
    a = aug(photo_rgb, seed=1)
    b = aug(photo_rgb, seed=2)
    for x, y in zip(a, b):
        assert not np.array_equal(x, y)


def test_views_within_one_call_differ(photo_rgb):
    views = small_aug()(photo_rgb, seed=0)
    assert not np.array_equal(views[0], views[1])
    assert not np.array_equal(views[2], views[3])


def test_seed_none_is_random(photo_rgb, photo_arrays):
    aug = small_aug()
    a = aug(photo_rgb)
    b = aug(photo_rgb, seed=None)
    assert not np.array_equal(a[0], b[0])
    g1, _ = aug.batch(photo_arrays)
    g2, _ = aug.batch(photo_arrays)
    assert not np.array_equal(g1, g2)


def test_same_output_regardless_of_thread_count(photo_rgb, photo_arrays):
    aug = small_aug()
    before = dino_rs.get_num_threads()
    try:
        dino_rs.set_num_threads(1)
        assert dino_rs.get_num_threads() == 1
        single = aug(photo_rgb, seed=9)
        g1, l1 = aug.batch(photo_arrays, seed=9)
        dino_rs.set_num_threads(2)
        assert dino_rs.get_num_threads() == 2
        multi = aug(photo_rgb, seed=9)
        g2, l2 = aug.batch(photo_arrays, seed=9)
    finally:
        dino_rs.set_num_threads(before)
    assert dino_rs.get_num_threads() == before
    assert_views_equal(single, multi)
    assert g1.tobytes() == g2.tobytes()
    assert l1.tobytes() == l2.tobytes()


# ---------------------------------------------------------------- input kinds


def test_path_str_pathlib_array_and_pil_agree(png_photo, photo_rgb):
    aug = small_aug()
    from_str = aug(str(png_photo), seed=4)
    from_path = aug(pathlib.Path(png_photo), seed=4)
    from_array = aug(photo_rgb, seed=4)
    with Image.open(png_photo) as im:
        im.load()
        from_pil = aug(im, seed=4)
    assert_views_equal(from_str, from_path)
    assert_views_equal(from_str, from_array)
    assert_views_equal(from_str, from_pil)


def test_jpeg_path_close_to_pil_decode(photo):
    """The file decoder and PIL may differ by rounding only (IDCT implementations differ)."""
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    with Image.open(photo) as im:
        arr = np.asarray(im.convert("RGB"))
    a = aug(photo, seed=1)
    b = aug(arr, seed=1)
    for x, y in zip(a, b):
        assert np.abs(unnormalize(x) - unnormalize(y)).mean() < 2.0


def test_gray_2d_array_equals_replicated_rgb(photo_rgb):
    aug = small_aug()
    gray = np.asarray(Image.fromarray(photo_rgb).convert("L"))
    assert gray.ndim == 2
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert_views_equal(aug(gray, seed=8), aug(rgb, seed=8))
    assert_views_equal(aug(gray[:, :, None], seed=8), aug(rgb, seed=8))
    # Batches of grey images too: (N, H, W).
    g1, l1 = aug.batch(np.stack([gray, gray]), seed=8)
    g2, l2 = aug.batch(np.stack([rgb, rgb]), seed=8)
    assert g1.tobytes() == g2.tobytes() and l1.tobytes() == l2.tobytes()


def test_pil_grayscale_image_object(photo_rgb):
    aug = small_aug()
    im = Image.fromarray(photo_rgb).convert("L")
    gray = np.asarray(im)
    assert_views_equal(aug(im, seed=2), aug(np.repeat(gray[:, :, None], 3, axis=2), seed=2))


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::-1],
        lambda a: a[::-1, :, ::-1],
        lambda a: a.transpose(1, 0, 2),
        lambda a: a[::2, 1::3],
        lambda a: np.asfortranarray(a),
    ],
    ids=["hflip", "flip-rows-and-channels", "transpose", "strided", "fortran"],
)
def test_non_contiguous_array_same_as_contiguous_copy(photo_rgb, view):
    aug = small_aug()
    arr = view(photo_rgb)
    copy = np.ascontiguousarray(arr)
    assert np.array_equal(arr, copy)
    assert_views_equal(aug(arr, seed=6), aug(copy, seed=6))
    g1, l1 = aug.batch([arr, copy], seed=6)
    assert g1[:, 0].tobytes() == aug.batch([copy, copy], seed=6)[0][:, 0].tobytes()


def test_fortran_ordered_red_image_stays_red():
    """A Fortran-contiguous array (e.g. np.asfortranarray, or img.T of a (3, W, H) array) holds the
    same pixels as its C-ordered copy; its memory order must not be taken as (H, W, 3) order."""
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, :, 0] = 255  # pure red
    f = np.asfortranarray(img)
    assert f.flags["F_CONTIGUOUS"] and not f.flags["C_CONTIGUOUS"]
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    for v in aug(f, seed=0):
        u = unnormalize(v)
        assert (u[0] == 255).all() and (u[1] == 0).all() and (u[2] == 0).all()
    g, _ = aug.batch(np.asfortranarray(np.stack([img, img])), seed=0)
    u = unnormalize(g)
    assert (u[:, :, 0] == 255).all() and (u[:, :, 1:] == 0).all()


def test_non_contiguous_batch_array(photo_arrays):
    aug = small_aug()
    stack = np.stack(photo_arrays)
    flipped = stack[:, :, ::-1]
    g1, l1 = aug.batch(flipped, seed=3)
    g2, l2 = aug.batch(np.ascontiguousarray(flipped), seed=3)
    assert g1.tobytes() == g2.tobytes() and l1.tobytes() == l2.tobytes()


def test_batch_list_of_arrays_equals_stacked_array(photo_arrays):
    aug = small_aug()
    g1, l1 = aug.batch(photo_arrays, seed=12)
    g2, l2 = aug.batch(np.stack(photo_arrays), seed=12)
    g3, l3 = aug.batch(tuple(photo_arrays), seed=12)
    assert g1.tobytes() == g2.tobytes() == g3.tobytes()
    assert l1.tobytes() == l2.tobytes() == l3.tobytes()


def test_batch_list_of_paths_equals_arrays(tmp_path, photo_arrays):
    paths = []
    for i, arr in enumerate(photo_arrays):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    aug = small_aug()
    g1, l1 = aug.batch([str(p) for p in paths], seed=5)
    g2, l2 = aug.batch(paths, seed=5)
    g3, l3 = aug.batch(photo_arrays, seed=5)
    assert g1.tobytes() == g2.tobytes() == g3.tobytes()
    assert l1.tobytes() == l2.tobytes() == l3.tobytes()
    # Mixed list of paths and arrays, images of different sizes.
    mixed = [paths[0], photo_arrays[1][:30, :50]]
    g, l = aug.batch(mixed, seed=5)
    assert g.shape == (2, 2, 3, 32, 32) and l.shape == (3, 2, 3, 16, 16)
    assert g[:, 0].tobytes() == g3[:, 0].tobytes()


def test_bundled_photo_paths_batch(photos):
    g, l = small_aug().batch(photos, seed=0)
    assert g.shape == (2, 4, 3, 32, 32) and l.shape == (3, 4, 3, 16, 16)
    assert np.isfinite(g).all()


# ---------------------------------------------------------------- what each transform does


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (10, 128, 250), (77, 3, 199)])
def test_normalisation_of_constant_image_is_exact(colour):
    aug = small_aug(**NO_PHOTOMETRICS, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    img = np.empty((40, 50, 3), np.uint8)
    img[:] = colour
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    expected = (np.asarray(colour, np.float32) / np.float32(255.0) - mean) / std
    for v in aug(img, seed=0):
        for c in range(3):
            assert np.abs(v[c] - expected[c]).max() <= 1e-6, (colour, c, v[c].min(), v[c].max())


def test_normalisation_with_custom_mean_std():
    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 2.0)
    aug = small_aug(**NO_PHOTOMETRICS, mean=mean, std=std)
    img = np.full((20, 20, 3), (51, 102, 204), np.uint8)
    expected = (np.array([51, 102, 204], np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    for v in aug(img, seed=3):
        assert np.abs(v - expected[:, None, None]).max() <= 1e-6


def test_identity_normalisation_reproduces_pixels_for_full_crop():
    """scale (1, 1) on a square image at crop size is the identity crop: pixels pass unchanged."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    aug = dino_rs.MultiCropAugmenter(
        global_size=32, local_size=32, n_local=1, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
        ratio=(1.0, 1.0), **NO_PHOTOMETRICS, **IDENTITY_NORM
    )
    for v in aug(img, seed=0):
        assert np.array_equal(unnormalize(v).transpose(1, 2, 0), img)


def test_grayscale_p_one_makes_channels_equal(photo_rgb):
    kw = dict(**IDENTITY_NORM, color_jitter_p=0.0)
    gray = small_aug(**kw, grayscale_p=1.0)(photo_rgb, seed=5)
    colour = small_aug(**kw, grayscale_p=0.0)(photo_rgb, seed=5)
    for v in gray:
        assert np.array_equal(v[0], v[1]) and np.array_equal(v[1], v[2])
    # Without it the photo keeps its colours.
    assert any(not np.array_equal(v[0], v[1]) for v in colour)


def test_grayscale_uses_itu_601_luma():
    kw = {**NO_PHOTOMETRICS, **IDENTITY_NORM, "grayscale_p": 1.0}
    aug = small_aug(**kw)
    img = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    expected = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # PIL's "L": 124
    for v in aug(img, seed=0):
        assert (unnormalize(v) == expected).all()


def test_solarize_only_affects_second_global_view(photo_rgb):
    kw = dict(**IDENTITY_NORM)
    on = small_aug(**kw, solarize_p=1.0)(photo_rgb, seed=13)
    off = small_aug(**kw, solarize_p=0.0)(photo_rgb, seed=13)
    assert on[0].tobytes() == off[0].tobytes()
    for v in range(2, 5):
        assert on[v].tobytes() == off[v].tobytes()
    assert not np.array_equal(on[1], off[1])
    # Solarize(128): values >= 128 inverted.
    u = unnormalize(off[1])
    assert np.array_equal(unnormalize(on[1]), np.where(u >= 128, 255 - u, u))


def test_flip_p_one_mirrors_the_view(photo_rgb):
    kw = dict(**NO_PHOTOMETRICS, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    kw.pop("flip_p")
    flipped = small_aug(**kw, flip_p=1.0)(photo_rgb, seed=21)
    plain = small_aug(**kw, flip_p=0.0)(photo_rgb, seed=21)
    for f, p in zip(flipped, plain):
        assert not np.array_equal(f, p)
        assert f.tobytes() == np.ascontiguousarray(p[:, :, ::-1]).tobytes()


def test_blur_p_one_smooths_the_view(photo_rgb):
    kw = dict(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    kw.pop("blur_p")
    sharp = small_aug(**kw, blur_p=(0.0, 0.0, 0.0))(photo_rgb, seed=1)
    blurred = small_aug(**kw, blur_p=(1.0, 1.0, 1.0), blur_sigma=(2.0, 2.0))(photo_rgb, seed=1)

    def roughness(v):
        return np.abs(np.diff(v, axis=2)).mean() + np.abs(np.diff(v, axis=1)).mean()

    for s, b in zip(sharp, blurred):
        assert roughness(b) < 0.8 * roughness(s)
        # Blurring keeps the mean colour.
        assert np.abs(s.mean() - b.mean()) < 0.02


def test_blur_only_where_its_probability_is_one(photo_rgb):
    kw = dict(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    kw.pop("blur_p")
    base = small_aug(**kw, blur_p=(0.0, 0.0, 0.0))(photo_rgb, seed=2)
    only_g1 = small_aug(**kw, blur_p=(1.0, 0.0, 0.0))(photo_rgb, seed=2)
    assert not np.array_equal(base[0], only_g1[0])
    for v in range(1, 5):
        assert base[v].tobytes() == only_g1[v].tobytes()


def test_color_jitter_changes_colours_only_when_enabled(photo_rgb):
    kw = dict(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    kw.pop("color_jitter_p")
    plain = small_aug(**kw, color_jitter_p=0.0)(photo_rgb, seed=4)
    jittered = small_aug(**kw, color_jitter_p=1.0)(photo_rgb, seed=4)
    zero_strength = small_aug(
        **kw, color_jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
    )(photo_rgb, seed=4)
    assert all(not np.array_equal(a, b) for a, b in zip(plain, jittered))
    assert_views_equal(plain, zero_strength)


def _gradient(width: int, height: int) -> np.ndarray:
    """Column x has value round(255 * x / (width - 1)) in every channel."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (height, width, 3)))


def test_crops_stay_within_scale_range():
    """A horizontal gradient image: the range of columns a crop spans reveals its width."""
    img = _gradient(120, 100)  # aspect 1.2, inside (3/4, 4/3)
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM, global_scale=(1.0, 1.0), local_scale=(0.05, 0.1))
    for seed in range(3):
        views = aug(img, seed=seed)
        # Scale 1 is only reachable as torchvision's fallback: the whole image.
        for v in views[:2]:
            u = unnormalize(v)
            assert u[0, :, 0].max() <= 6 and u[0, :, -1].min() >= 249
            assert (np.diff(u[0], axis=1) >= 0).all()  # left to right, not mirrored
        # Locals span at most sqrt(0.1 * 12000 * 4/3) = 40 columns = 86 grey levels.
        for v in views[2:]:
            u = unnormalize(v)
            assert 5 < u[0].max() - u[0].min() < 100


def test_crop_fallback_is_centre_crop_at_the_ratio_limit():
    """torchvision's fallback for a 4:1 image: the centred crop of aspect 4/3 (133 of 400 columns)."""
    img = _gradient(400, 100)
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM, global_scale=(1.0, 1.0))
    for v in aug(img, seed=0)[:2]:
        u = unnormalize(v)[0]
        left, right = 255 * 133 / 399, 255 * 266 / 399  # 85, 170
        assert abs(u[:, 0].mean() - left) <= 4, u[:, 0].mean()
        assert abs(u[:, -1].mean() - right) <= 4, u[:, -1].mean()


# ---------------------------------------------------------------- small images


def test_image_smaller_than_crop_is_upsampled(photo_rgb):
    small = np.ascontiguousarray(photo_rgb[:5, :7])
    views = small_aug()(small, seed=0)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(np.isfinite(v).all() for v in views)
    g, l = small_aug().batch([small, photo_rgb], seed=0)
    assert g.shape == (2, 2, 3, 32, 32)


def test_small_constant_image_upsamples_to_constant():
    img = np.full((5, 7, 3), (30, 140, 220), np.uint8)
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    for v in aug(img, seed=1):
        u = unnormalize(v)
        assert (u[0] == 30).all() and (u[1] == 140).all() and (u[2] == 220).all()


def test_one_pixel_image():
    img = np.array([[[200, 100, 50]]], np.uint8)
    views = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)(img, seed=0)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for v in views:
        u = unnormalize(v)
        assert (u[0] == 200).all() and (u[1] == 100).all() and (u[2] == 50).all()
    # With every default transform on it still works.
    views = small_aug()(img, seed=0)
    assert all(np.isfinite(v).all() for v in views)
    views = small_aug()(np.array([[7]], np.uint8), seed=0)
    assert len(views) == 5


def test_one_row_and_one_column_images():
    for shape in [(1, 50, 3), (50, 1, 3)]:
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        views = small_aug()(img, seed=0)
        assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        assert all(np.isfinite(v).all() for v in views)


# ---------------------------------------------------------------- file formats through the augmenter


@pytest.mark.parametrize("fmt", ["png", "bmp", "webp", "tiff", "gif"])
def test_lossless_formats_decode_like_pil(format_files, fmt):
    path = format_files[fmt]
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    aug = small_aug()
    assert_views_equal(aug(path, seed=3), aug(ref, seed=3))


def test_jpeg_format_decodes_close_to_pil(format_files):
    path = format_files["jpeg"]
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    aug = small_aug(**NO_PHOTOMETRICS, **IDENTITY_NORM)
    for a, b in zip(aug(path, seed=3), aug(ref, seed=3)):
        assert np.abs(unnormalize(a) - unnormalize(b)).max() <= 4
