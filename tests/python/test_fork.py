"""dino_rs in a child made by fork() (multiprocessing's default start method on Linux): the child
inherits the thread pools' state but not their threads, and must not wait on them forever."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

import dino_rs as dr
from helpers import make_loader, tiny

IMAGES = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
TRAIN_IMAGES = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)

pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork() on this platform")


def _put_result(q, fn, args) -> None:
    q.put(fn(*args))


def in_forked_child(fn, *args, timeout: float = 120):
    """`fn(*args)` computed in a fork()ed child; fails the test if the child hangs or dies."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_put_result, args=(q, fn, args))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"{fn.__name__} in the forked child hung on a thread pool inherited from the parent")
    assert p.exitcode == 0
    return q.get(timeout=10)


def _augment() -> tuple:
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    return aug.batch(IMAGES, seed=0)


def test_augmenter_works_in_a_forked_child_after_the_parent_used_it():
    g, l = _augment()  # the parent's pool now has running threads
    g2, l2 = in_forked_child(_augment)
    np.testing.assert_array_equal(g2, g)
    np.testing.assert_array_equal(l2, l)
    np.testing.assert_array_equal(_augment()[0], g)  # and the parent's pool still works


def _train_two_steps(batches) -> np.ndarray:
    # out_dim 16384: the head's tensors are large enough for candle's own element-wise thread pool
    t = dr.Trainer(tiny(out_dim=16384), make_loader(TRAIN_IMAGES), epochs=2, warmup_epochs=1, progress=False)
    for g, l in batches:
        t.step(g, l)
    return t.model.embed(TRAIN_IMAGES, progress=False)


def test_training_in_a_forked_child_after_the_parent_trained():
    batches = [b for _, b in zip(range(2), make_loader(TRAIN_IMAGES))]
    expected = _train_two_steps(batches)  # the parent has now used every thread pool
    np.testing.assert_array_equal(in_forked_child(_train_two_steps, batches), expected)
    np.testing.assert_array_equal(_train_two_steps(batches), expected)  # the parent still trains
