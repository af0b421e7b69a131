"""dino_rs in a child made by fork() (multiprocessing's default start method on Linux): the child
inherits the thread pool's state but not its threads, and must not wait on them forever."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

import dino_rs as dr

IMAGES = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def _augment_in_child(q) -> None:
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    g, l = aug.batch(IMAGES, seed=0)
    q.put((g, l))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork() on this platform")
def test_augmenter_works_in_a_forked_child_after_the_parent_used_it():
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    g, l = aug.batch(IMAGES, seed=0)  # the parent's pool now has running threads
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_augment_in_child, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung on the inherited thread pool")
    assert p.exitcode == 0
    g2, l2 = q.get(timeout=10)
    np.testing.assert_array_equal(g2, g)
    np.testing.assert_array_equal(l2, l)
    # and the parent's pool still works
    np.testing.assert_array_equal(aug.batch(IMAGES, seed=0)[0], g)
