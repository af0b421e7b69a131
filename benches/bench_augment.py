"""DINO multi-crop augmentation throughput: dino_rs against the official torchvision recipe.

How to run (from the repository root)::

    pip install ".[bench]" && python benches/bench_augment.py

Options: ``--seconds`` (measured wall time per configuration, default 10), ``--warmup`` (default 2),
``--workers`` (N, default ``os.cpu_count()``), ``--dir`` (photo cache, default ./bench_out/photos),
``--n-images`` (default 64), ``--batch-size`` (default 32), ``--results`` (markdown file, default
benches/RESULTS.md next to this script), ``--no-write``, ``--wait-idle`` (seconds in all to wait for
other processes to leave the CPUs alone before a measurement, default 120), ``--retries``
(re-measurements of a configuration disturbed by other processes, default 1; the least disturbed
run is kept) and ``--rounds`` (default 3: every configuration is measured that often, the rounds
interleaved, and the median is reported with the range; on a shared VM single runs of the same
configuration were seen to differ by 25 % with no other process visible inside the machine).

What it does

1. Builds a set of real photos: the RGB photos bundled with scikit-image (astronaut, chelsea, coffee,
   rocket, the left and right stereo motorcycle frames, hubble_deep_field, retina,
   immunohistochemistry) and scikit-learn's ``load_sample_images()`` (china, flower), re-cut at random
   positions and scales (fixed seed), resized with PIL to 500x375 and saved as quality-90 JPEGs.
   The set is cached in ``--dir`` and rebuilt only when its parameters change.
2. Defines ``DataAugmentationDINO`` exactly as in the official DINO repository (main_dino.py, with
   utils.GaussianBlur / utils.Solarization) and loads images with DINO's ``pil_loader``.
3. Measures images/s, JPEG decode included, every output batched (B-stacked float32), for
   (a) torchvision in one process (``DataLoader(num_workers=0, batch_size=B)``,
   ``torch.set_num_threads(1)``), (b) torchvision with ``DataLoader(num_workers=N, batch_size=B)``,
   (c) ``dino_rs.MultiCropAugmenter().batch(paths)`` on batches of B paths with
   ``dino_rs.set_num_threads(1)`` and (d) the same with ``set_num_threads(N)``.
   Each configuration runs in its own child process of this script, one after the other: torch is
   never imported in the dino_rs processes (nothing else competes for the cores), each gets a clean
   peak-RSS figure, and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` are 1
   everywhere (the torchvision recipe runs single-threaded PIL code; DataLoader workers also use 1 torch
   thread). After a warm-up, batches are timed with ``time.perf_counter`` until ``--seconds`` have
   passed, cycling over the file list.
4. Prints a table (images/s, per thread, dino_rs/torchvision at equal thread count, thread-scaling
   efficiency, CPU cores busy during the measurement, ours and other processes', images per CPU
   second of our processes, peak RSS) and
5. writes it, with date, machine and command, between the markers
   ``<!-- augment-bench:start -->`` and ``<!-- augment-bench:end -->`` of RESULTS.md (other content kept).

The "other" CPU column is the machine-wide busy time (/proc/stat) minus that of the benchmark's own
processes. A measurement counts as disturbed when others used more than the cores it leaves free
(os.cpu_count() - threads) plus 0.2: then it waits, measures again and reports undisturbed rounds
where it has them; the "images per CPU-s" column is the least sensitive to other load.
The script also warns (and notes in RESULTS.md) when the installed dino_rs extension is older than
the checkout's augmentation sources (src/augment, src/data, ...; Cargo.toml/lock), i.e. when
``pip install .`` has not been rerun after a change there.
"""

from __future__ import annotations

import os

# Before numpy / torch are imported, here and (inherited) in the child processes.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import datetime
import json
import platform
import random
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CONTENDED,
    format_markdown,
    format_text,
    machine_info,
    proc_cpu_s,
    source_state,
    system_busy_s,
    wait_for_idle,
    write_results,
)

START_MARK = "<!-- augment-bench:start -->"
END_MARK = "<!-- augment-bench:end -->"
PHOTO_W, PHOTO_H, JPEG_QUALITY = 500, 375, 90
PHOTO_SEED = 1234
PHOTO_SET_VERSION = 1


# --------------------------------------------------------------------------------------------------
# 1. The photo set
# --------------------------------------------------------------------------------------------------


def _source_photos():
    """(name, uint8 HxWx3) of the RGB photos bundled with scikit-image and scikit-learn."""
    import numpy as np
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    left, right = data.stereo_motorcycle()[:2]
    out = [
        ("astronaut", data.astronaut()),
        ("chelsea", data.chelsea()),
        ("coffee", data.coffee()),
        ("rocket", data.rocket()),
        ("motorcycle_left", left),
        ("motorcycle_right", right),
        ("hubble_deep_field", data.hubble_deep_field()),
        ("retina", data.retina()),
        ("immunohistochemistry", data.immunohistochemistry()),
    ]
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        out.append((Path(fname).stem, img))  # china, flower
    for name, img in out:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (name, img.shape)
    return out


def make_photos(directory: Path, n: int) -> list[str]:
    """``n`` ~500x375 quality-90 JPEG re-cuts of the source photos in ``directory`` (cached)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.json"
    params = {"version": PHOTO_SET_VERSION, "n": n, "seed": PHOTO_SEED, "size": [PHOTO_W, PHOTO_H],
              "quality": JPEG_QUALITY}
    names = [f"photo_{i:04d}.jpg" for i in range(n)]
    paths = [str(directory / name) for name in names]
    try:
        cached = json.loads(manifest.read_text())
    except (OSError, ValueError):
        cached = None
    if cached and cached.get("params") == params and all(os.path.isfile(p) for p in paths):
        print(f"photos: using the cached set in {directory}")
        return paths

    sources = _source_photos()
    rng = np.random.default_rng(PHOTO_SEED)
    origin = []
    for i, path in enumerate(paths):
        name, src = sources[i % len(sources)]  # every source photo equally often
        h, w = src.shape[:2]
        # The largest 4:3 rectangle inside the photo, then a random fraction of its area.
        cw, ch = (w, w * 3 / 4) if w * 3 / 4 <= h else (h * 4 / 3, h)
        scale = rng.uniform(0.3, 1.0)
        cw, ch = max(32, int(round(cw * scale**0.5))), max(24, int(round(ch * scale**0.5)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((PHOTO_W, PHOTO_H), Image.Resampling.LANCZOS)
        img.save(path, "JPEG", quality=JPEG_QUALITY)
        origin.append({"file": names[i], "source": name, "crop_xywh": [x0, y0, cw, ch]})
    manifest.write_text(json.dumps({"params": params, "files": origin}, indent=1))
    print(f"photos: wrote {n} re-cuts of {len(sources)} source photos to {directory}")
    return paths


def describe_photos(paths: list[str]) -> dict:
    from PIL import Image

    sizes = [os.path.getsize(p) for p in paths]
    dims = []
    for p in paths:
        with Image.open(p) as im:
            dims.append(im.size)
    mean_w = sum(d[0] for d in dims) / len(dims)
    mean_h = sum(d[1] for d in dims) / len(dims)
    return {"n": len(paths), "mean_kib": sum(sizes) / len(sizes) / 1024, "mean_w": mean_w, "mean_h": mean_h,
            "total_mib": sum(sizes) / 2**20}


# --------------------------------------------------------------------------------------------------
# 2. The official DINO recipe (main_dino.py / utils.py of facebookresearch/dino)
# --------------------------------------------------------------------------------------------------


def pil_loader(path):
    """torchvision.datasets.folder.pil_loader, as used by DINO's ImageFolder."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class GaussianBlur:
    """DINO's utils.GaussianBlur: PIL Gaussian blur with a random radius, applied with probability p."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        from PIL import ImageFilter

        do_it = random.random() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """DINO's utils.Solarization: PIL solarize with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        from PIL import ImageOps

        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class DataAugmentationDINO:
    """main_dino.py's DataAugmentationDINO (defaults: global scale (0.4, 1), local (0.05, 0.4), 8 locals)."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8):
        from PIL import Image
        from torchvision import transforms

        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                p=0.8,
            ),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

        # first global crop
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=Image.BICUBIC),
            flip_and_color_jitter,
            GaussianBlur(1.0),
            normalize,
        ])
        # second global crop
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(224, scale=global_crops_scale, interpolation=Image.BICUBIC),
            flip_and_color_jitter,
            GaussianBlur(0.1),
            Solarization(0.2),
            normalize,
        ])
        # transformation for the local small crops
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(96, scale=local_crops_scale, interpolation=Image.BICUBIC),
            flip_and_color_jitter,
            GaussianBlur(p=0.5),
            normalize,
        ])

    def __call__(self, image):
        crops = []
        crops.append(self.global_transfo1(image))
        crops.append(self.global_transfo2(image))
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


class PathDataset:
    """Map-style dataset over the photo paths, cycled to ``length`` items: pil_loader + DINO transform."""

    def __init__(self, paths, transform, length):
        self.paths = list(paths)
        self.transform = transform
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.transform(pil_loader(self.paths[index % len(self.paths)]))


# --------------------------------------------------------------------------------------------------
# 3. Timing (runs in a child process per configuration)
# --------------------------------------------------------------------------------------------------


def _tree_cpu_s(child_pids) -> float:
    return proc_cpu_s() + sum(proc_cpu_s(p) for p in child_pids)


def _measure(step, warmup_s, seconds, min_warmup_steps, child_pids=lambda: ()):
    """Runs ``step()`` (returns #images) for a warm-up, then times whole steps for >= ``seconds``."""
    t_start = time.perf_counter()
    n_warm = 0
    while n_warm < min_warmup_steps or time.perf_counter() - t_start < warmup_s:
        step()
        n_warm += 1
    pids = list(child_pids())
    cpu0, sys0 = _tree_cpu_s(pids), system_busy_s()
    t0 = time.perf_counter()
    images = steps = 0
    while True:
        images += step()
        steps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu1, sys1 = _tree_cpu_s(pids), system_busy_s()
    ours = (cpu1 - cpu0) / elapsed
    machine = (sys1 - sys0) / elapsed
    return {"images": images, "steps": steps, "elapsed": elapsed, "images_per_s": images / elapsed,
            "cores_ours": ours, "cores_other": max(0.0, machine - ours)}


def _stats(globals_, locals_):
    import numpy as np

    g, lo = np.asarray(globals_, dtype=np.float64), np.asarray(locals_, dtype=np.float64)
    return {"global_mean": float(g.mean()), "global_std": float(g.std()),
            "local_mean": float(lo.mean()), "local_std": float(lo.std())}


def run_torchvision(paths, workers, batch_size, warmup_s, seconds):
    import torch
    from torch.utils.data import DataLoader
    import multiprocessing
    import torchvision
    import PIL

    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    transform = DataAugmentationDINO()
    length = len(paths) * max(1, 10**6 // len(paths))  # "endless": cycles the file list
    loader = DataLoader(PathDataset(paths, transform, length), batch_size=batch_size, shuffle=False,
                        num_workers=workers, drop_last=True)
    it = iter(loader)
    first = []

    def step():
        batch = next(it)  # list of 10 tensors (B, 3, S, S)
        if not first:
            first.append(batch)
        return batch[0].shape[0]

    def children():
        return [p.pid for p in multiprocessing.active_children()]

    # DataLoader workers: each one has finished a batch and the next round is under way.
    res = _measure(step, warmup_s, seconds, min_warmup_steps=workers + 1 if workers else 1, child_pids=children)
    del it  # shuts the workers down (persistent_workers=False)
    for p in multiprocessing.active_children():
        p.join(timeout=10)
    b = first[0]
    res.update(_stats(torch.stack(b[:2]).numpy(), torch.stack(b[2:]).numpy()))
    res["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    return res


def run_dino_rs(paths, threads, batch_size, warmup_s, seconds):
    import numpy as np
    import dino_rs as dr

    dr.set_num_threads(threads)
    assert dr.get_num_threads() == threads
    aug = dr.MultiCropAugmenter()
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    counter = [0]
    first = []

    def step():
        k = counter[0]
        counter[0] += 1
        batch = batches[k % len(batches)]
        globals_, locals_ = aug.batch(batch, seed=k)
        if not first:
            first.append((globals_, locals_))
        return globals_.shape[1]

    res = _measure(step, warmup_s, seconds, min_warmup_steps=1)
    g, lo = first[0]
    assert g.shape == (2, len(batches[0]), 3, 224, 224) and g.dtype == np.float32, g.shape
    assert lo.shape == (8, len(batches[0]), 3, 96, 96) and lo.dtype == np.float32, lo.shape
    res.update(_stats(g, lo))
    so = Path(dr._dino_rs.__file__)
    built = datetime.datetime.fromtimestamp(so.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    res["versions"] = {"dino_rs": f"{dr.__version__} (extension built {built})"}
    return res


def child_main(args) -> None:
    paths = json.loads(Path(args.paths_file).read_text())
    config, n = args.child, args.workers
    if config == "tv1":
        res = run_torchvision(paths, 0, args.batch_size, args.warmup, args.seconds)
    elif config == "tvN":
        res = run_torchvision(paths, n, args.batch_size, args.warmup, args.seconds)
    elif config == "rs1":
        res = run_dino_rs(paths, 1, args.batch_size, args.warmup, args.seconds)
    elif config == "rsN":
        res = run_dino_rs(paths, n, args.batch_size, args.warmup, args.seconds)
    else:
        raise SystemExit(f"unknown configuration {config!r}")
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN: the largest terminated (joined) child, i.e. a worker.
    res["rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["rss_child_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------
# 4. Table and 5. RESULTS.md
# --------------------------------------------------------------------------------------------------


def allowed_other(threads: int) -> float:
    """Cores other processes may use without taking any from a measurement that uses ``threads``."""
    return max(0, (os.cpu_count() or 1) - threads) + CONTENDED


def stale_extension() -> str | None:
    """A warning when the installed dino_rs extension is older than this checkout's augmentation sources."""
    import importlib.util

    spec = importlib.util.find_spec("dino_rs")
    root = Path(__file__).resolve().parent.parent
    if spec is None or not spec.submodule_search_locations or not (root / "src").is_dir():
        return None
    libs = [q for d in spec.submodule_search_locations for q in Path(d).glob("_dino_rs*") if q.suffix in (".so", ".pyd")]
    src = root / "src"
    # What the augmentation path compiles from (the training code in the same crate does not matter here).
    sources = [*(src / "augment").rglob("*.rs"), *(src / "data").rglob("*.rs"), src / "parallel.rs",
               src / "config.rs", src / "error.rs", src / "python" / "augment.rs", src / "python" / "numpy.rs",
               root / "Cargo.toml", root / "Cargo.lock"]
    sources = [q for q in sources if q.is_file()]
    if not libs or not sources:
        return None
    built = max(q.stat().st_mtime for q in libs)
    newest = max(sources, key=lambda q: q.stat().st_mtime)
    if newest.stat().st_mtime > built + 1:
        return (f"the installed dino_rs extension ({libs[0]}) is older than {newest.relative_to(root)}: "
                f"the numbers may not reflect this checkout (reinstall with `pip install .`)")
    return None


def build_table(results: dict, n: int) -> tuple[list[str], list[list[str]]]:
    header = ["config", "threads", "images/s", "images/s per thread", "dino_rs / torchvision",
              "scaling efficiency", "CPU cores busy (ours / other)", "images per CPU-s", "peak RSS MiB"]
    rows = []
    for key, threads in (("tv1", 1), ("tvN", n), ("rs1", 1), ("rsN", n)):
        r = results[key]
        ips = r["images_per_s"]
        tv_key = "tv1" if threads == 1 else "tvN"
        ratio = f"{ips / results[tv_key]['images_per_s']:.2f}x" if key.startswith("rs") else "-"
        one = "tv1" if key.startswith("tv") else "rs1"
        eff = f"{ips / (threads * results[one]['images_per_s']) * 100:.0f}%" if threads > 1 else "-"
        rss = f"{r['rss_self_mib']:.0f}"
        if key == "tvN":
            label = f"torchvision DataLoader, {n} workers"
            rss += f" + {n} x {r['rss_child_mib']:.0f} (workers)"
        elif key == "tv1":
            label = "torchvision, 1 process"
        else:
            label = f"dino_rs, set_num_threads({threads})"
        ips_txt = f"{ips:.1f}"
        if len(r["all_ips"]) > 1:
            ips_txt += f" ({min(r['all_ips']):.1f}-{max(r['all_ips']):.1f})"
        rows.append([label, str(threads), ips_txt, f"{ips / threads:.1f}", ratio, eff,
                     f"{r['cores_ours']:.2f} / {r['cores_other']:.2f}",
                     f"{ips / r['cores_ours']:.1f}" if r["cores_ours"] > 0 else "-", rss])
    return header, rows


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="./bench_out/photos", help="photo cache directory (default ./bench_out/photos)")
    p.add_argument("--n-images", type=int, default=64, help="number of JPEG files (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for all configurations (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured wall time per configuration (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per configuration (default 2)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="N: DataLoader workers and dino_rs threads of the multi-threaded rows (default: os.cpu_count())")
    p.add_argument("--results", default=str(here / "RESULTS.md"), help="markdown file to update (default benches/RESULTS.md)")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="seconds in all to wait for other processes to leave the CPUs alone (default 120)")
    p.add_argument("--retries", type=int, default=1,
                   help="re-measure a configuration this often when other processes were busy (default 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every configuration this often, interleaved, and report the median (default 3)")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    n = args.workers
    if n < 1 or args.batch_size < 1 or args.n_images < args.batch_size or args.rounds < 1:
        p.error("need --workers >= 1, --batch-size >= 1, --n-images >= --batch-size and --rounds >= 1")

    command = f"{Path(sys.executable).name} {shlex.join(sys.argv)}"
    machine = machine_info()
    load = os.getloadavg()
    print(f"machine: {machine['model']}, {machine['cpus']} CPUs ({machine.get('cores')} cores), "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > 0.5:
        print("warning: the machine is not idle; other processes may take CPU time from the benchmark")

    source = source_state()  # now, before the tree can change under a long run
    stale = stale_extension()
    print(f"source: {source}")
    if stale:
        print(f"warning: {stale}")

    photo_dir = Path(args.dir)
    paths = make_photos(photo_dir, args.n_images)
    desc = describe_photos(paths)
    print(f"photos: {desc['n']} JPEG files (quality {JPEG_QUALITY}), mean {desc['mean_kib']:.1f} KiB, "
          f"mean {desc['mean_w']:.0f}x{desc['mean_h']:.0f} px, {desc['total_mib']:.1f} MiB in all")

    paths_file = photo_dir / "paths.json"
    paths_file.write_text(json.dumps([str(Path(q).resolve()) for q in paths]))
    keys = ("tv1", "tvN", "rs1", "rsN")
    runs, versions = {k: [] for k in keys}, {}
    idle_budget = [max(0.0, args.wait_idle)]
    for rnd in range(args.rounds):  # rounds interleave the configurations, so slow drifts hit all alike
        for key in keys:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--paths-file", str(paths_file),
                   "--workers", str(n), "--batch-size", str(args.batch_size), "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup)]
            threads = 1 if key.endswith("1") else n
            what = "torchvision" if key.startswith("tv") else "dino_rs"
            rnd_txt = f", round {rnd + 1}/{args.rounds}" if args.rounds > 1 else ""
            print(f"running {key} ({what}, {threads} thread(s){rnd_txt}) ...", flush=True)
            best, allowed = None, allowed_other(threads)
            for attempt in range(1 + max(0, args.retries)):
                wait_for_idle(idle_budget, allowed)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    sys.stderr.write(proc.stdout + proc.stderr)
                    raise SystemExit(f"configuration {key} failed (exit {proc.returncode})")
                r = json.loads(found[-1][len("RESULT "):])
                print(f"  {r['images_per_s']:.1f} images/s ({r['images']} images in {r['elapsed']:.1f} s, "
                      f"{r['steps']} batches; CPU cores busy: ours {r['cores_ours']:.2f}, "
                      f"other {r['cores_other']:.2f})", flush=True)
                if best is None or r["cores_other"] < best["cores_other"]:
                    best = r
                r["disturbed"] = r["cores_other"] > allowed
                if not r["disturbed"]:
                    break
                if attempt < args.retries:
                    print(f"  other processes were busy ({r['cores_other']:.2f} cores): measuring again", flush=True)
            versions.update(best.pop("versions"))
            runs[key].append(best)
    # Each configuration's median round (the lower middle one for an even count), over the rounds that
    # other processes left alone when there are any.
    results = {}
    for key in keys:
        quiet = [r for r in runs[key] if not r["disturbed"]] or runs[key]
        ordered = sorted(quiet, key=lambda r: r["images_per_s"])
        results[key] = dict(ordered[(len(ordered) - 1) // 2], all_ips=[r["images_per_s"] for r in runs[key]])

    header, rows = build_table(results, n)
    print()
    print(format_text(header, rows))
    per_core = results["rs1"]["images_per_s"] / results["tv1"]["images_per_s"]
    eff = results["rsN"]["images_per_s"] / (n * results["rs1"]["images_per_s"])
    print()
    print(f"dino_rs / torchvision per core (1 thread): {per_core:.2f}x; at {n} threads: "
          f"{results['rsN']['images_per_s'] / results['tvN']['images_per_s']:.2f}x; "
          f"dino_rs thread-scaling efficiency at {n}: {eff * 100:.0f}%")
    print("output check (mean / std of the normalised views, first batch): " + "; ".join(
        f"{k}: global {results[k]['global_mean']:+.3f}/{results[k]['global_std']:.3f}, "
        f"local {results[k]['local_mean']:+.3f}/{results[k]['local_std']:.3f}" for k in ("tv1", "rs1")))
    disturbed = [k for k in keys if results[k]["disturbed"]]
    if disturbed:
        print(f"warning: other processes took CPU time from the reported {', '.join(disturbed)} measurement(s) "
              "(see the CPU column); those numbers are pessimistic")

    if args.no_write:
        return
    today = datetime.date.today().isoformat()
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    cores = f"{machine['cpus']} CPUs" + (f" ({machine['cores']} cores)" if machine.get("cores") else "")
    section = f"""## Multi-crop augmentation throughput: dino_rs vs torchvision

- Date: {today}
- Machine: {machine['model']}, {cores}{', ' + machine['hypervisor'] + ' VM' if machine.get('hypervisor') else ''}; \
{platform.system()} {platform.release()}; Python {platform.python_version()}; {vers}
- Command (repository root): `{command}`; source: {source}
- Workload: {desc['n']} JPEG photos (re-cuts of the scikit-image / scikit-learn sample photos), \
mean {desc['mean_w']:.0f}x{desc['mean_h']:.0f} px, {desc['mean_kib']:.1f} KiB, quality {JPEG_QUALITY}; \
official DINO recipe (2 x 224 px global + 8 x 96 px local views), JPEG decode included, batches of \
{args.batch_size}, {args.seconds:g} s measured per configuration after {args.warmup:g} s warm-up; images/s is the median of {args.rounds} interleaved round(s) (of the undisturbed ones when there are any), \
range of all rounds in parentheses.
- torchvision = `DataAugmentationDINO` from main_dino.py with `pil_loader`, through `DataLoader` \
(`num_workers=0` with `torch.set_num_threads(1)`, or `num_workers={n}`); dino_rs = \
`MultiCropAugmenter().batch(paths)` after `set_num_threads(k)`. Every configuration runs in its own process; \
`OMP_NUM_THREADS=1`.
- "dino_rs / torchvision" compares equal thread counts; scaling efficiency = images/s at {n} / \
({n} x images/s at 1). CPU "other" = machine-wide busy cores not used by the benchmark (a run counts as \
undisturbed when they fit on the cores it leaves free, plus {CONTENDED}); \
"images per CPU-s" = images / CPU seconds of the benchmark's processes (less sensitive to other load).

{format_markdown(header, rows)}

dino_rs / torchvision per core: **{per_core:.2f}x**; dino_rs scaling efficiency at {n} threads: **{eff * 100:.0f}%**.
"""
    if disturbed:
        section += (f"\nNote: other processes took CPU time from the reported {', '.join(disturbed)} "
                    "measurement(s) (see the CPU column); those numbers are pessimistic.\n")
    if stale:
        section += f"\nNote: {stale}.\n"
    write_results(Path(args.results), section, START_MARK, END_MARK)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
