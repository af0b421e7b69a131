"""Faults and long runs: kill -9 during a checkpoint save, real Ctrl-C (SIGINT) during fit, embed
and loader iteration, loaders dropped mid-epoch, memory over 2,000 steps and two Python threads at
once (fork()ed children: test_fork.py)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dino_rs as dr
from helpers import make_loader, tiny

LINUX = sys.platform.startswith("linux")
IMAGES = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
TRAIN = dict(epochs=2, warmup_epochs=1, progress=False)


def thread_names() -> list[str]:
    """Names of this process's OS threads (Linux: /proc/self/task/*/comm)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            pass
    return names


def loader_threads() -> int:
    return sum(n == "dino-rs-loader" for n in thread_names())


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sigint_after(seconds: float) -> threading.Timer:
    """Sends this process a real SIGINT from another thread after `seconds` (like Ctrl-C)."""
    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    return t


needs_proc = pytest.mark.skipif(not LINUX, reason="reads thread names and RSS from Linux's /proc")


# --------------------------------------------------------------------------------------------------
# kill -9 during a checkpoint save
# --------------------------------------------------------------------------------------------------
# The child trains one step, then rewrites the same checkpoint, printing the iteration after each
# completed save. The checkpoint is large (~50 MB: a wide head, plus the teacher and AdamW's two
# moments) so that most of the child's time goes into writing it, and a kill at a random moment
# lands inside a save most of the time; the test checks that some kills did (the interrupted save's
# temporary file is there).
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import dino_rs as dr
    sys.path.insert(0, {tests!r})
    from helpers import make_loader, tiny
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    loader = dr.MultiCropLoader(dr.ArrayDataset(images), aug, batch_size=8)
    model = tiny(out_dim=16384, hidden_dim=128, bottleneck_dim=192)
    t = dr.Trainer(model, loader, epochs=100, warmup_epochs=1, progress=False)
    g, l = next(iter(loader))
    while True:
        t.step(g, l)
        t.save({path!r})
        print(t.iteration, flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
def test_kill_9_during_save_keeps_the_previous_checkpoint_and_resume_continues(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    script = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    rng = np.random.default_rng(0)
    kills = mid_save = 0
    while mid_save < 3:
        assert kills < 60, f"only {mid_save} of {kills} kills landed inside a save"
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            # wait for two completed saves, then kill at a random moment of the following ones
            saved = [int(child.stdout.readline()), int(child.stdout.readline())]
            time.sleep(rng.uniform(0.0, 0.3))
            child.kill()
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        saved += [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        kills += 1
        temps = [p for p in tmp_path.iterdir() if p != path]
        mid_save += bool(temps)

        # the checkpoint on disk is a complete one: the last save that finished, or the one the
        # kill interrupted if its rename had already happened
        t = dr.Trainer.resume(path, make_loader(IMAGES))
        assert t.iteration in (saved[-1], saved[-1] + 1), (t.iteration, saved[-5:])
        # and training goes on from there: one more step, then a save that replaces it
        g, l = next(iter(make_loader(IMAGES)))
        assert np.isfinite(t.step(g, l)["loss"])
        t.save(path)
        # the next save removed the killed save's temporary file
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], temps
        assert dr.Trainer.resume(path, make_loader(IMAGES)).iteration == t.iteration
        path.unlink()
    print(f"{kills} kills, {mid_save} inside a save")


# --------------------------------------------------------------------------------------------------
# Ctrl-C (a real SIGINT) while Rust code runs
# --------------------------------------------------------------------------------------------------
@needs_proc
def test_sigint_during_fit_stops_it_leaks_no_thread_and_the_trainer_goes_on():
    images = np.random.default_rng(1).integers(0, 256, (512, 16, 16, 3), dtype=np.uint8)
    t = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    steps = []
    started = threading.Event()
    # the signal comes from another thread once training is under way (after step 5 of 128),
    # and lands wherever the main thread is: inside a step, in the loader, or in the callback
    sender = threading.Thread(target=lambda: started.wait(60) and os.kill(os.getpid(), signal.SIGINT))
    sender.start()

    def on_step(s):
        steps.append(s["iteration"])
        if len(steps) == 5:
            started.set()

    with pytest.raises(KeyboardInterrupt):
        t.fit(callback=on_step)
    sender.join()
    assert 5 <= t.iteration < 2 * 64, "the SIGINT came after the run had ended"
    # the signal stops fit at a step boundary: inside the callback of the last finished step
    # (Python may raise before the lambda appends) or between steps
    assert t.iteration - len(steps) in (0, 1), (t.iteration, len(steps))
    assert loader_threads() == 0
    hist = t.fit()  # finishes both epochs from where it stopped
    assert t.iteration == 2 * 64 and [h["epoch"] for h in hist][-1] == 2
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert loader_threads() == 0


@needs_proc
def test_sigint_during_embed_raises_and_the_model_stays_usable():
    m = tiny()
    images = np.random.default_rng(2).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    expected = m.embed(images, batch_size=4, progress=False)
    big = np.random.default_rng(3).integers(0, 256, (40000, 16, 16, 3), dtype=np.uint8)
    before = len(thread_names())
    timer = sigint_after(0.1)  # the embed takes ~2 s on a 2-core machine
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        m.embed(big, batch_size=4, progress=False)
    timer.join()
    assert time.monotonic() - start < 10, "embed noticed Ctrl-C only at the end"
    assert len(thread_names()) <= before
    np.testing.assert_array_equal(m.embed(images, batch_size=4, progress=False), expected)


@needs_proc
def test_sigint_during_loader_iteration_stops_its_thread_and_the_loader_stays_usable():
    images = np.random.default_rng(4).integers(0, 256, (4096, 64, 64, 3), dtype=np.uint8)
    loader = make_loader(images, batch_size=16, prefetch=1)
    first = [g for g, _ in iter(make_loader(images[:64], batch_size=16, shuffle=False))]
    timer = sigint_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            time.sleep(0.01)
    timer.join()
    assert loader_threads() == 0
    # a new epoch from the same loader works, and a fresh loader gives what it always gave
    assert sum(1 for _ in loader) == len(loader)
    again = [g for g, _ in iter(make_loader(images[:64], batch_size=16, shuffle=False))]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert loader_threads() == 0


# --------------------------------------------------------------------------------------------------
# loaders dropped mid-epoch
# --------------------------------------------------------------------------------------------------
@needs_proc
@pytest.mark.parametrize("how", ["del", "close", "break", "exception"])
def test_loader_abandoned_mid_epoch_leaves_no_thread(how):
    images = np.random.default_rng(5).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    loader = make_loader(images, batch_size=8)
    for _ in range(3):  # repeated, so a leak would add up
        it = iter(loader)
        next(it)
        assert loader_threads() == 1
        if how == "del":
            del it
        elif how == "close":
            it.close()
            with pytest.raises(StopIteration):
                next(it)
            del it
        elif how == "break":
            for i, _ in enumerate(it):
                if i == 2:
                    break
            del it
        else:
            with pytest.raises(RuntimeError):
                for _ in it:
                    raise RuntimeError("user code failed mid-epoch")
            del it
        gc.collect()
        assert loader_threads() == 0


# --------------------------------------------------------------------------------------------------
# memory over a long run
# --------------------------------------------------------------------------------------------------
@needs_proc
def test_rss_stays_flat_over_2000_steps():
    # 2,000 steps of a tiny model through fit (loader threads, one per epoch, included); RSS is
    # sampled every step and must stay within 5% of its value after a 200-step warm-up
    images = np.random.default_rng(6).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    t = dr.Trainer(tiny(), make_loader(images), epochs=250, warmup_epochs=1, progress=False)
    rss = []
    t.fit(callback=lambda s: rss.append(rss_bytes()))
    assert len(rss) == 2000
    base = rss[199]
    worst = max(rss[200:])
    drift = worst / base - 1
    print(f"RSS after warm-up {base / 2**20:.1f} MiB, max over steps 200-2000 {worst / 2**20:.1f} MiB ({drift:+.2%})")
    assert drift <= 0.05, f"RSS grew {drift:.1%} after warm-up ({base} -> {worst} bytes)"
    assert loader_threads() == 0


# --------------------------------------------------------------------------------------------------
# two Python threads at once
# --------------------------------------------------------------------------------------------------
def test_two_threads_embed_at_once_give_the_serial_results():
    m = tiny()
    rng = np.random.default_rng(7)
    inputs = [rng.integers(0, 256, (48, 20, 20, 3), dtype=np.uint8) for _ in range(8)]
    serial = [m.embed(x, batch_size=8, progress=False) for x in inputs]
    with ThreadPoolExecutor(2) as ex:
        for _ in range(3):
            together = list(ex.map(lambda x: m.embed(x, batch_size=8, progress=False), inputs))
            for a, b in zip(serial, together):
                np.testing.assert_array_equal(a, b)


def test_two_threads_augment_at_once_give_the_serial_results():
    aug = dr.MultiCropAugmenter(global_size=32, local_size=16, n_local=4)
    rng = np.random.default_rng(8)
    inputs = [rng.integers(0, 256, (16, 48, 64, 3), dtype=np.uint8) for _ in range(8)]
    serial = [aug.batch(x, seed=i) for i, x in enumerate(inputs)]
    with ThreadPoolExecutor(2) as ex:
        for _ in range(3):
            together = list(ex.map(lambda ix: aug.batch(ix[1], seed=ix[0]), enumerate(inputs)))
            for (g, l), (g2, l2) in zip(serial, together):
                np.testing.assert_array_equal(g, g2)
                np.testing.assert_array_equal(l, l2)
