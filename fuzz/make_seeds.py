"""Regenerates the seed files of fuzz/corpus/ (run from the repository root with Pillow, numpy and
an installed dino_rs: `python3 fuzz/make_seeds.py`). The seeds are committed; this script only
documents how they were made. No torch needed: the .pth seeds are written with pickle + zipfile
the way torch.save lays them out."""

import collections
import io
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile
import zlib

import numpy as np
from PIL import Image

import dino_rs

DEC = "fuzz/corpus/decode_augment"
CKPT = "fuzz/corpus/checkpoint"


def png_chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def png(w, h, depth, colour, raw):
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def images():
    os.makedirs(DEC, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in dino_rs.bundled_photos()]

    def small(i, n=48):
        im = photos[i].copy()
        im.thumbnail((n, n))
        return im

    def save(name, im, **kw):
        im.save(os.path.join(DEC, name), **kw)

    save("seed.png", small(0))
    save("seed_small.png", small(1, 16))
    save("seed.jpg", small(1), quality=80)
    save("seed_progressive.jpg", small(2), quality=70, progressive=True)
    save("seed_grey.jpg", small(3).convert("L"), quality=75)
    save("seed_cmyk.jpg", small(0).convert("CMYK"), quality=75)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    save("seed_exif_rot.jpg", small(2, 40), quality=70, exif=exif.tobytes())
    save("seed.gif", small(1).convert("P", palette=Image.ADAPTIVE, colors=32))
    small(3, 24).convert("P").save(
        os.path.join(DEC, "seed_anim.gif"), save_all=True, append_images=[small(0, 24).convert("P")], duration=50, loop=0
    )
    save("seed.bmp", small(1, 20))
    save("seed_grey.bmp", small(1, 16).convert("L"))
    save("seed_lossy.webp", small(2), quality=60)
    save("seed_lossless.webp", small(3, 24), lossless=True)
    save("seed_alpha.webp", small(0, 24).convert("RGBA"), quality=60)
    save("seed.tiff", small(2, 24))
    save("seed_lzw.tiff", small(3, 24), compression="tiff_lzw")
    save("seed_deflate_grey.tiff", small(0, 24).convert("L"), compression="tiff_adobe_deflate")
    Image.fromarray(np.asarray(small(0, 32).convert("L"), dtype=np.uint16) * 257).save(os.path.join(DEC, "seed_grey16.png"))
    pal = small(1, 32).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(os.path.join(DEC, "seed_palette_trns.png"), transparency=0)
    save("seed_rgba.png", small(2, 24).convert("RGBA"))
    save("seed_la.png", small(3, 24).convert("LA"))
    save("seed_1bit.png", small(3, 24).convert("1"))
    Image.new("RGB", (1, 1), (10, 200, 30)).save(os.path.join(DEC, "seed_1x1.png"))
    Image.new("RGB", (64, 1), (10, 200, 30)).save(os.path.join(DEC, "seed_64x1.png"))
    Image.new("RGB", (1, 64), (10, 20, 230)).save(os.path.join(DEC, "seed_1x64.jpg"))
    a = np.asarray(small(1, 24)).astype(">u2") * 257  # RGB 16-bit PNG (Pillow cannot write one)
    raw = b"".join(b"\x00" + row.tobytes() for row in a)
    open(os.path.join(DEC, "seed_rgb16.png"), "wb").write(png(a.shape[1], a.shape[0], 16, 2, raw))
    # A header claiming 100000x100000 pixels (refused before decoding).
    open(os.path.join(DEC, "seed_bomb_header.png"), "wb").write(png(100000, 100000, 8, 2, b"\0" * 1000))


# --- torch.save layout without torch -----------------------------------------------------------
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, torch_utils


class FloatStorage:
    pass


class HalfStorage:
    pass


def _rebuild_tensor_v2(*args):
    pass


FloatStorage.__module__ = HalfStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage, torch.HalfStorage, torch_utils._rebuild_tensor_v2 = FloatStorage, HalfStorage, _rebuild_tensor_v2


class Storage:
    def __init__(self, key, arr, cls):
        self.key, self.arr, self.cls = key, arr, cls


class FakeTensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        args = (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, str(obj.key), "cpu", obj.arr.size)
        return None


def write_pth(path, tensors, wrap=None, half=False, name="archive"):
    rng = np.random.default_rng(0)
    storages, state = [], {}
    for i, (k, shape) in enumerate(tensors):
        arr = (rng.standard_normal(int(np.prod(shape))) * 0.02).astype(np.float16 if half else np.float32)
        st = Storage(i, arr, HalfStorage if half else FloatStorage)
        storages.append(st)
        state[k] = FakeTensor(st, shape)
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state if wrap is None else {wrap: state, "epoch": 3})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", buf.getvalue())
        z.writestr(f"{name}/byteorder", "little")
        for st in storages:
            z.writestr(f"{name}/data/{st.key}", st.arr.tobytes())
        z.writestr(f"{name}/version", "3\n")
    return buf.getvalue()


def backbone(D=8, p=2, g=2, depth=1, prefix=""):
    t = [("cls_token", (1, 1, D)), ("pos_embed", (1, 1 + g * g, D))]
    t += [("patch_embed.proj.weight", (D, 3, p, p)), ("patch_embed.proj.bias", (D,))]
    for i in range(depth):
        b = f"blocks.{i}."
        t += [(b + "norm1.weight", (D,)), (b + "norm1.bias", (D,))]
        t += [(b + "attn.qkv.weight", (3 * D, D)), (b + "attn.qkv.bias", (3 * D,))]
        t += [(b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,))]
        t += [(b + "norm2.weight", (D,)), (b + "norm2.bias", (D,))]
        t += [(b + "mlp.fc1.weight", (4 * D, D)), (b + "mlp.fc1.bias", (4 * D,))]
        t += [(b + "mlp.fc2.weight", (D, 4 * D)), (b + "mlp.fc2.bias", (D,))]
    t += [("norm.weight", (D,)), ("norm.bias", (D,))]
    return [(prefix + k, s) for k, s in t]


def checkpoints():
    os.makedirs(CKPT, exist_ok=True)
    pkl = write_pth(f"{CKPT}/seed_tiny_backbone.pth", backbone())
    open(f"{CKPT}/seed_legacy_pickle.pkl", "wb").write(pkl)  # a bare pickle (legacy torch.save starts 0x80)
    write_pth(
        f"{CKPT}/seed_tiny_teacher_ckpt.pth",
        backbone(prefix="module.backbone.") + [("module.head.last_layer.weight_g", (1, 4))],
        wrap="teacher",
        name="checkpoint",
    )
    write_pth(f"{CKPT}/seed_tiny_half_2blocks.pth", backbone(D=4, p=1, g=3, depth=2), half=True)
    shutil.copy("tests/fixtures/vit_tiny_p4.pth", f"{CKPT}/seed_vit_tiny_p4.pth")
    # (tests/fixtures/vit_tiny_p4.safetensors seeded the runs too; seed_dino_backbone covers its layout.)
    m = dino_rs.DINO(
        arch="vit_tiny", patch_size=2, img_size=4, out_dim=8, hidden_dim=8, bottleneck_dim=4,
        embed_dim=8, depth=1, num_heads=2, nlayers=2, drop_path_rate=0.0, device="cpu",
    )  # fmt: skip
    m.save(f"{CKPT}/seed_dino_model.safetensors")
    m.export_backbone(f"{CKPT}/seed_dino_backbone.safetensors")
    trainer = dino_rs._dino_rs._Trainer(m, batch_size=1, niter_per_ep=2, n_local=1, epochs=2, warmup_epochs=1)
    rng = np.random.default_rng(0)
    trainer.step(rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng.standard_normal((1, 3, 2, 2)).astype(np.float32))
    trainer.save(f"{CKPT}/seed_trainer.safetensors", '{"note": "seed"}')


if __name__ == "__main__":
    images()
    checkpoints()
