"""dino_rs.Trainer: steps, schedules, fit, checkpoints, exact resume, interruption, validation.

Tiny model (patch 4, 16x16 globals, 8x8 locals, embed 24, depth 2) on 32 random 16x16 images with
batches of 8 (4 iterations per epoch): every test takes well under a second.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
import pytest

import dino_rs as dr
from helpers import make_loader, read_safetensors, tiny

N_IMAGES = 32
BATCH = 8
NITER = N_IMAGES // BATCH  # 4 iterations per epoch (drop_last)
TRAIN = dict(epochs=2, warmup_epochs=1, progress=False)

MEASURES = {"teacher_entropy", "teacher_student_kl", "teacher_max_prob"}
STEP_KEYS = {"loss", "lr", "wd", "momentum", "teacher_temp", "iteration", "epoch"} | MEASURES
EPOCH_KEYS = {"epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "seconds"} | MEASURES


def overflowing_crops(model: dr.DINO, like: np.ndarray, tmp_path) -> np.ndarray:
    """Finite crops (float32 max in magnitude) whose patch embedding overflows: each pixel takes the
    sign of its weight for output channel 0, so that channel sums |w| * 3.4e38 with sum |w| > 1."""
    model.export_backbone(tmp_path / "b.safetensors")
    w = read_safetensors(tmp_path / "b.safetensors")[0]["patch_embed.proj.weight"][0]  # (3, p, p)
    assert np.abs(w).sum() > 1.5
    p = w.shape[-1]
    reps = (like.shape[-2] // p, like.shape[-1] // p)
    pattern = np.tile(np.sign(w), (1,) + reps) * np.finfo(np.float32).max
    return np.broadcast_to(pattern, like.shape).astype(np.float32).copy()


def augmenter() -> dr.MultiCropAugmenter:
    return dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)


@pytest.fixture
def loader(images) -> dr.MultiCropLoader:
    return make_loader(images)


@pytest.fixture(scope="module")
def probe() -> np.ndarray:
    """Fixed normalised crops to read the networks' features with."""
    return np.random.default_rng(7).standard_normal((6, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def batch(images):
    g, l = augmenter().batch(images[:BATCH], seed=1)
    assert g.shape == (2, BATCH, 3, 16, 16) and g.dtype == np.float32
    assert l.shape == (2, BATCH, 3, 8, 8) and l.dtype == np.float32
    return g, l


# --------------------------------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------------------------------
def test_step_returns_stats(loader, batch):
    t = dr.Trainer(tiny(), loader, **TRAIN)
    assert t.iteration == 0 and t.epoch == 0
    s = t.step(*batch)
    assert set(s) == STEP_KEYS
    assert s["iteration"] == 0 and s["epoch"] == 0
    assert math.isfinite(s["loss"]) and s["loss"] > 0
    assert s["lr"] == 0.0  # linear warm-up starts at 0
    assert s["wd"] == pytest.approx(0.04)
    assert s["momentum"] == pytest.approx(0.996)
    assert s["teacher_temp"] == pytest.approx(0.04)
    assert t.iteration == 1
    s2 = t.step(*batch)
    assert s2["iteration"] == 1 and t.iteration == 2


def test_step_accepts_flattened_crops(images, batch):
    g, l = batch
    a = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    b = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    sa = a.step(g, l)
    sb = b.step(g.reshape(2 * BATCH, 3, 16, 16), l.reshape(2 * BATCH, 3, 8, 8))
    assert sa["loss"] == sb["loss"]


def test_schedules_follow_cosine_scheduler(loader, batch):
    lr, min_lr, epochs, warmup = 5e-4, 1e-6, 3, 1
    t = dr.Trainer(tiny(), loader, epochs=epochs, lr=lr, min_lr=min_lr, warmup_epochs=warmup,
                   weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, progress=False)
    base_lr = lr * BATCH / 256
    lrs = dr.cosine_scheduler(base_lr, min_lr, epochs, NITER, warmup_epochs=warmup)
    wds = dr.cosine_scheduler(0.04, 0.4, epochs, NITER)
    ms = dr.cosine_scheduler(0.996, 1.0, epochs, NITER)
    for it in range(6):
        s = t.step(*batch)
        assert s["iteration"] == it
        assert s["epoch"] == it // NITER
        assert s["lr"] == pytest.approx(lrs[it], rel=1e-12, abs=1e-15)
        assert s["wd"] == pytest.approx(wds[it], rel=1e-12)
        assert s["momentum"] == pytest.approx(ms[it], rel=1e-12)
    # warm-up ends at base_lr = lr * batch / 256 on the first iteration after it
    assert lrs[NITER] == pytest.approx(base_lr)


def test_teacher_temp_warmup_in_steps(loader, batch):
    t = dr.Trainer(tiny(), loader, epochs=3, warmup_epochs=0, warmup_teacher_temp=0.02, teacher_temp=0.06,
                   warmup_teacher_temp_epochs=3, progress=False)
    temps = [t.step(*batch)["teacher_temp"] for _ in range(3 * NITER)]
    expected = np.repeat(np.linspace(0.02, 0.06, 3), NITER)
    np.testing.assert_allclose(temps, expected, rtol=1e-12)


def test_step_changes_student_more_than_teacher(loader, batch, probe):
    m = tiny()
    t = dr.Trainer(m, loader, epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    before_s = m.forward_backbone(probe, teacher=False)
    before_t = m.forward_backbone(probe, teacher=True)
    np.testing.assert_array_equal(before_s, before_t)
    t.step(*batch)
    ds = np.abs(m.forward_backbone(probe, teacher=False) - before_s).max()
    dt = np.abs(m.forward_backbone(probe, teacher=True) - before_t).max()
    assert ds > 1e-4
    assert dt > 0  # the EMA moved it ...
    assert dt < 0.1 * ds  # ... by (1 - 0.996) of the student's change, roughly


def test_step_first_iteration_lr_zero_keeps_student(loader, batch, probe):
    # with warm-up the first lr is exactly 0: AdamW moves nothing
    m = tiny()
    t = dr.Trainer(m, loader, **TRAIN)
    before = m.forward_backbone(probe, teacher=False)
    assert t.step(*batch)["lr"] == 0.0
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=False), before)


def test_step_rejects_bad_crops(loader, batch, probe):
    m = tiny()
    t = dr.Trainer(m, loader, **TRAIN)
    g, l = batch
    bad = g.copy()
    bad[0, 1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        t.step(bad, l)
    bad = l.copy()
    bad[1, 0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        t.step(g, bad)
    with pytest.raises(ValueError, match="float32"):
        t.step(g.astype(np.float64), l)
    with pytest.raises(ValueError):
        t.step(g)  # the loader's augmenter makes 2 local crops: the loss needs them
    with pytest.raises(ValueError):
        t.step(g[0], l)  # 3-D
    assert t.iteration == 0


def test_non_finite_loss_raises_and_keeps_state(images, batch, probe, tmp_path):
    # drop_path_rate=0: the failed step's forward pass still draws stochastic-depth randomness, which
    # is not part of the "nothing changes" promise; without it the twin comparison below is exact
    m = tiny(drop_path_rate=0.0)
    t = dr.Trainer(m, make_loader(images), epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    g, l = batch
    t.step(g, l)
    before_s = m.forward_backbone(probe, teacher=False)
    before_t = m.forward_backbone(probe, teacher=True)
    huge = overflowing_crops(m, g, tmp_path)
    with pytest.raises(FloatingPointError, match="iteration 1"):
        t.step(huge, l)
    assert t.iteration == 1
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=False), before_s)
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=True), before_t)
    # nothing else moved either (optimiser, centre, schedules): the next step equals a twin's
    twin = tiny(drop_path_rate=0.0)
    tt = dr.Trainer(twin, make_loader(images), epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    tt.step(g, l)
    g2, l2 = augmenter().batch(images[8:16], seed=3)
    sa, sb = t.step(g2, l2), tt.step(g2, l2)
    assert sa == sb
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=False), twin.forward_backbone(probe, teacher=False))
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=True), twin.forward_backbone(probe, teacher=True))


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------
def test_fit_two_epochs(loader, probe, capfd):
    m = tiny()
    before = m.forward_backbone(probe)
    t = dr.Trainer(m, loader, **TRAIN)
    hist = t.fit()
    assert len(hist) == 2
    for i, h in enumerate(hist):
        assert EPOCH_KEYS <= set(h)
        assert h["epoch"] == i + 1
        assert math.isfinite(h["loss"]) and h["loss"] > 0
        assert h["seconds"] >= 0
        # The collapse measures, in nats: entropy in [0, ln K], KL = loss - entropy >= 0.
        k = m.out_dim
        assert 0 <= h["teacher_entropy"] <= math.log(k) + 1e-4
        assert 1 / k - 1e-6 <= h["teacher_max_prob"] <= 1
        assert h["teacher_student_kl"] == pytest.approx(h["loss"] - h["teacher_entropy"], abs=1e-6)
        assert h["teacher_student_kl"] > -1e-4
    assert t.epoch == 2 and t.iteration == 2 * NITER
    assert t.history == hist
    # the last values reported are those of the last iteration of each epoch
    lrs = dr.cosine_scheduler(5e-4 * BATCH / 256, 1e-6, 2, NITER, warmup_epochs=1)
    assert hist[0]["lr"] == pytest.approx(lrs[NITER - 1])
    assert hist[1]["lr"] == pytest.approx(lrs[-1])
    assert hist[1]["momentum"] == pytest.approx(dr.cosine_scheduler(0.996, 1.0, 2, NITER)[-1])
    assert hist[1]["wd"] == pytest.approx(dr.cosine_scheduler(0.04, 0.4, 2, NITER)[-1])
    assert np.abs(m.forward_backbone(probe) - before).max() > 1e-6
    # progress=False prints nothing
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    # done: nothing more to do
    assert t.fit(epochs=1) == []
    assert t.fit() == []
    assert t.iteration == 2 * NITER
    with pytest.raises(ValueError, match="epochs"):
        t.fit(epochs=3)


def test_fit_in_parts_equals_fit_at_once(images):
    a = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    ha = a.fit()
    b = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    hb = b.fit(epochs=1) + b.fit(epochs=2)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert [h["epoch"] for h in hb] == [1, 2]


def test_fit_is_reproducible(images, probe):
    ra, rb = tiny(), tiny()
    ha = dr.Trainer(ra, make_loader(images), **TRAIN).fit()
    hb = dr.Trainer(rb, make_loader(images), **TRAIN).fit()
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    np.testing.assert_array_equal(ra.forward_backbone(probe), rb.forward_backbone(probe))


PHASES = ["teacher_forward", "student_forward", "loss", "backward", "clip", "adamw", "ema", "center"]


def test_profiled_steps_time_each_phase_and_train_the_same(images, batch, probe):
    plain, profiled = tiny(), tiny()
    a = dr.Trainer(plain, make_loader(images), **TRAIN)
    b = dr.Trainer(profiled, make_loader(images), **TRAIN)
    assert b.profile is False
    b.profile = True
    for _ in range(2):
        sa = a.step(*batch)
        t = time.perf_counter()
        sb = b.step(*batch)
        wall = time.perf_counter() - t
        assert set(sa) == STEP_KEYS
        assert set(sb) == STEP_KEYS | {f"time_{p}" for p in PHASES}
        assert sb["loss"] == sa["loss"]
        times = [sb[f"time_{p}"] for p in PHASES]
        assert all(x >= 0 for x in times) and 0 < sum(times) <= wall
        # The forward and backward passes are the step's bulk, not its bookkeeping.
        assert sb["time_backward"] > sb["time_center"]
    np.testing.assert_array_equal(plain.forward_backbone(probe), profiled.forward_backbone(probe))
    b.profile = False
    assert set(b.step(*batch)) == STEP_KEYS


def test_profiled_fit_adds_data_time_and_epoch_means(images):
    t = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    t.profile = True
    seen = []
    hist = t.fit(epochs=1, callback=seen.append)
    keys = [f"time_{p}" for p in ["data"] + PHASES]
    assert len(seen) == NITER and all(set(s) == STEP_KEYS | set(keys) for s in seen)
    assert EPOCH_KEYS <= set(hist[0]) and {k for k in hist[0] if k.startswith("time_")} == set(keys)
    for k in keys:
        assert hist[0][k] == pytest.approx(np.mean([s[k] for s in seen]), rel=1e-9)
    assert sum(hist[0][k] for k in keys) * NITER <= hist[0]["seconds"]


def test_fit_callback_per_step(loader):
    seen = []
    t = dr.Trainer(tiny(), loader, **TRAIN)
    hist = t.fit(epochs=1, callback=seen.append)
    assert [s["iteration"] for s in seen] == list(range(NITER))
    assert all(set(s) == STEP_KEYS for s in seen)
    assert hist[0]["loss"] == pytest.approx(np.mean([s["loss"] for s in seen]), rel=1e-12)


def test_fit_with_progress_bar(loader):
    t = dr.Trainer(tiny(), loader, epochs=1, warmup_epochs=0, progress=True)
    hist = t.fit()
    assert len(hist) == 1 and t.epoch == 1


def test_no_collapse_warning_on_a_normal_run(loader):
    t = dr.Trainer(tiny(), loader, **TRAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit()
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_config_holds_the_recipe(loader):
    t = dr.Trainer(tiny(), loader, epochs=3, lr=1e-3, warmup_epochs=1, teacher_temp=0.05, progress=False)
    c = t.config
    assert c["epochs"] == 3 and c["lr"] == 1e-3 and c["teacher_temp"] == 0.05
    assert c["batch_size"] == BATCH and c["niter_per_ep"] == NITER and c["n_local"] == 2


# --------------------------------------------------------------------------------------------------
# checkpoints and resume
# --------------------------------------------------------------------------------------------------
def test_checkpoint_files(images, tmp_path):
    d = tmp_path / "ckpt"
    t = dr.Trainer(tiny(), make_loader(images), epochs=3, warmup_epochs=1, checkpoint_dir=d, saveckp_freq=2,
                   progress=False)
    listings = []
    t.fit(callback=lambda s: listings.append(sorted(os.listdir(d)) if d.exists() else []))
    # the latest checkpoint from the end of epoch 1 on, checkpoint0002 from the end of epoch 2 on
    assert listings[0] == [] and listings[NITER - 1] == []
    assert listings[NITER] == ["checkpoint.safetensors"]
    assert listings[2 * NITER] == ["checkpoint.safetensors", "checkpoint0002.safetensors"]
    # numbered every saveckp_freq epochs and at the end; no temporary files left
    assert sorted(os.listdir(d)) == [
        "checkpoint.safetensors",
        "checkpoint0002.safetensors",
        "checkpoint0003.safetensors",
    ]
    # the latest checkpoint holds the final model
    m = dr.DINO.load(d / "checkpoint.safetensors", device="cpu")
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(m.forward_backbone(x), t.model.forward_backbone(x))
    np.testing.assert_array_equal(m.forward_backbone(x, teacher=False), t.model.forward_backbone(x, teacher=False))
    # the numbered one of epoch 2 is an older state
    m2 = dr.DINO.load(d / "checkpoint0002.safetensors", device="cpu")
    assert np.abs(m2.forward_backbone(x, teacher=False) - m.forward_backbone(x, teacher=False)).max() > 1e-7


def test_checkpoint_at_the_end_of_each_fit_call(images, tmp_path):
    # fit(epochs=k) also keeps a numbered checkpoint of epoch k (trainer.py: `or epoch == target`)
    d = tmp_path / "ckpt"
    t = dr.Trainer(tiny(), make_loader(images), epochs=3, warmup_epochs=1, checkpoint_dir=d, saveckp_freq=5,
                   progress=False)
    t.fit(epochs=1)
    assert sorted(os.listdir(d)) == ["checkpoint.safetensors", "checkpoint0001.safetensors"]


def test_checkpoint_every_epoch(images, tmp_path):
    d = tmp_path / "ckpt"
    dr.Trainer(tiny(), make_loader(images), **TRAIN, checkpoint_dir=d, saveckp_freq=1).fit()
    assert sorted(os.listdir(d)) == [
        "checkpoint.safetensors",
        "checkpoint0001.safetensors",
        "checkpoint0002.safetensors",
    ]


def test_resume_continues_exactly(images, tmp_path, probe):
    # two epochs straight ...
    ma = tiny()
    a = dr.Trainer(ma, make_loader(images), **TRAIN)
    ha = a.fit()
    # ... versus one epoch, checkpoint, resume in a new trainer, one epoch
    d = tmp_path / "ckpt"
    b = dr.Trainer(tiny(), make_loader(images), **TRAIN, checkpoint_dir=d, saveckp_freq=1)
    hb = b.fit(epochs=1)
    assert hb[0]["loss"] == ha[0]["loss"]
    del b
    c = dr.Trainer.resume(d, make_loader(images), progress=False)
    assert c.iteration == NITER and c.epoch == 1 and c.epochs == 2
    assert c.checkpoint_dir == d and c.saveckp_freq == 1
    assert len(c.history) == 1 and c.history[0]["epoch"] == 1
    assert c.history[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-12)
    hc = c.fit()
    assert len(hc) == 1 and hc[0]["epoch"] == 2
    assert hc[0]["loss"] == pytest.approx(ha[1]["loss"], rel=0, abs=1e-6)
    for k in ("lr", "wd", "momentum", "teacher_temp"):
        assert hc[0][k] == pytest.approx(ha[1][k], rel=1e-12)
    assert c.iteration == a.iteration == 2 * NITER
    for teacher in (True, False):
        np.testing.assert_allclose(
            c.model.forward_backbone(probe, teacher=teacher), ma.forward_backbone(probe, teacher=teacher),
            rtol=0, atol=1e-5,
        )
    assert [h["epoch"] for h in c.history] == [1, 2]
    assert sorted(os.listdir(d)) == ["checkpoint.safetensors", "checkpoint0001.safetensors", "checkpoint0002.safetensors"]


def test_resume_from_a_file_and_step_by_step(images, tmp_path, batch, probe):
    g, l = batch
    ma = tiny()
    a = dr.Trainer(ma, make_loader(images), epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    losses_a = [a.step(g, l)["loss"] for _ in range(3)]
    mb = tiny()
    b = dr.Trainer(mb, make_loader(images), epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    b.step(g, l)
    path = tmp_path / "state.safetensors"
    b.save(path)
    c = dr.Trainer.resume(path, make_loader(images), progress=False)
    assert c.iteration == 1
    losses_c = [c.step(g, l)["loss"] for _ in range(2)]
    assert losses_c == pytest.approx(losses_a[1:], rel=0, abs=1e-6)
    for teacher in (True, False):
        np.testing.assert_allclose(c.model.forward_backbone(probe, teacher=teacher),
                                   ma.forward_backbone(probe, teacher=teacher), rtol=0, atol=1e-5)


def test_resume_with_other_loader_length(images, tmp_path):
    d = tmp_path / "ckpt"
    dr.Trainer(tiny(), make_loader(images), **TRAIN, checkpoint_dir=d).fit(epochs=1)
    with pytest.raises(ValueError, match="batches per epoch"):
        dr.Trainer.resume(d, make_loader(images, batch_size=4))
    with pytest.raises(ValueError, match="batches per epoch"):
        dr.Trainer.resume(d, make_loader(images[:16]))


def test_resume_bad_files(tmp_path, images):
    missing = tmp_path / "nothing"
    missing.mkdir()
    with pytest.raises(FileNotFoundError):
        dr.Trainer.resume(missing, make_loader(images))
    model_only = tmp_path / "model.safetensors"
    tiny().save(model_only)
    with pytest.raises(ValueError, match="trainer checkpoint") as e:
        dr.Trainer.resume(model_only, make_loader(images))
    assert str(model_only) in str(e.value)
    text = tmp_path / "text.safetensors"
    text.write_text("not a checkpoint at all")
    with pytest.raises(ValueError) as e:
        dr.Trainer.resume(text, make_loader(images))
    assert str(text) in str(e.value)


# --------------------------------------------------------------------------------------------------
# interruption
# --------------------------------------------------------------------------------------------------
def interrupt_on(n: int):
    calls = []

    def cb(stats):
        calls.append(stats["iteration"])
        if len(calls) == n:
            raise KeyboardInterrupt

    return cb, calls


def test_keyboard_interrupt_keeps_the_finished_step(images, probe):
    m = tiny()
    t = dr.Trainer(m, make_loader(images), **TRAIN)
    cb, calls = interrupt_on(2)
    with pytest.raises(KeyboardInterrupt):
        t.fit(callback=cb)
    assert calls == [0, 1]
    assert t.iteration == 2
    assert t.history == []
    # the weights are those after step 2: a twin trained for exactly 2 steps on the same batches agrees
    twin = tiny()
    tt = dr.Trainer(twin, make_loader(images), **TRAIN)
    cb2, _ = interrupt_on(2)
    with pytest.raises(KeyboardInterrupt):
        tt.fit(callback=cb2)
    np.testing.assert_array_equal(m.forward_backbone(probe, teacher=False), twin.forward_backbone(probe, teacher=False))
    # a following fit() goes on without error and ends with the epochs done
    hist = t.fit()
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert t.epoch == 2


def test_keyboard_interrupt_then_fit_stays_within_the_schedule(images):
    # fit() trains until `epochs` epochs are done in total: after an interruption at iteration 2 of
    # epoch 1, finishing must not run more than epochs * len(loader) iterations in total (the
    # schedules were built for exactly that many)
    t = dr.Trainer(tiny(), make_loader(images), **TRAIN)
    cb, _ = interrupt_on(2)
    with pytest.raises(KeyboardInterrupt):
        t.fit(callback=cb)
    seen = []
    t.fit(callback=lambda s: seen.append(s["iteration"]))
    assert t.iteration == 2 * NITER, seen
    assert seen == list(range(2, 2 * NITER))


# --------------------------------------------------------------------------------------------------
# hyper-parameter validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=2, warmup_epochs=3), "warmup_epochs"),
        (dict(teacher_temp=0.0), "temperatures"),
        (dict(warmup_teacher_temp=-0.1), "temperatures"),
        (dict(student_temp=0.0), "temperatures"),
        (dict(saveckp_freq=0), "saveckp_freq"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(min_lr=-1.0), "min_lr"),
        (dict(momentum_teacher=1.5), "momentum_teacher"),
        (dict(center_momentum=-0.1), "center_momentum"),
        (dict(weight_decay=-0.1), "weight decay"),
        (dict(clip_grad=-1.0), "clip_grad"),
    ],
)
def test_invalid_hyper_parameters(loader, kw, needle):
    args = {**dict(epochs=2, warmup_epochs=1, progress=False), **kw}
    with pytest.raises(ValueError, match=needle):
        dr.Trainer(tiny(), loader, **args)


def test_trainer_uses_the_loader_batch_size(images, batch):
    # lr is scaled by the loader's batch size: batch 4 gives half the base lr of batch 8
    t4 = dr.Trainer(tiny(), make_loader(images, batch_size=4), epochs=2, warmup_epochs=0, progress=False)
    t8 = dr.Trainer(tiny(), make_loader(images, batch_size=8), epochs=2, warmup_epochs=0, progress=False)
    assert t4.config["batch_size"] == 4 and t4.config["niter_per_ep"] == 8
    assert t4.step(*batch)["lr"] == pytest.approx(5e-4 * 4 / 256)
    assert t8.step(*batch)["lr"] == pytest.approx(5e-4 * 8 / 256)


def test_training_is_the_same_bit_for_bit_on_one_or_two_threads():
    # Reductions run in fixed-size tasks added in task order, and gemm does not split its inner
    # dimension across threads: so the number of threads changes no result. A model wide enough
    # that gemm and the row kernels do split their work.
    rng = np.random.default_rng(0)
    images = (rng.random((32, 32, 32, 3)) * 255).astype(np.uint8)
    g = rng.standard_normal((2, 16, 3, 32, 32)).astype(np.float32)
    l = rng.standard_normal((2, 16, 3, 16, 16)).astype(np.float32)
    before = dr.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            dr.set_num_threads(n)
            m = dr.DINO(patch_size=4, img_size=32, embed_dim=96, depth=2, num_heads=3, out_dim=512,
                        hidden_dim=256, bottleneck_dim=64, seed=0, device="cpu")
            aug = dr.MultiCropAugmenter(global_size=32, local_size=16, n_local=2)
            loader = dr.MultiCropLoader(dr.ArrayDataset(images), aug, batch_size=16)
            t = dr.Trainer(m, loader, epochs=2, warmup_epochs=1, progress=False)
            losses = [t.step(g, l)["loss"] for _ in range(3)]
            runs.append((losses, m.forward_backbone(g.reshape(-1, 3, 32, 32), teacher=False)))
    finally:
        dr.set_num_threads(before)
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])


def test_collapse_warnings_name_the_kind_and_the_fix():
    from dino_rs.trainer import collapse_kind

    k = 256
    uniform = {"teacher_entropy": math.log(k) - 1e-4, "teacher_student_kl": 1e-4, "teacher_max_prob": 1 / k}
    assert "uniform collapse" in collapse_kind(uniform, k) and "lower teacher_temp" in collapse_kind(uniform, k)
    one = {"teacher_entropy": 1e-3, "teacher_student_kl": 1e-3, "teacher_max_prob": 0.9995}
    assert "one-dimension collapse" in collapse_kind(one, k) and "raise teacher_temp" in collapse_kind(one, k)
    # Sharp but diverse targets the student has not matched yet: learning, not collapse.
    assert collapse_kind({"teacher_entropy": 1e-3, "teacher_student_kl": 2.0, "teacher_max_prob": 0.99}, k) is None
    assert collapse_kind({"teacher_entropy": 3.0, "teacher_student_kl": 1e-3, "teacher_max_prob": 0.2}, k) is None
    assert collapse_kind({"loss": 1.0}, k) is None


def test_a_uniform_collapse_is_warned_about(images):
    # A teacher temperature far above the student's makes the targets flat: centering wins.
    m = tiny()
    t = dr.Trainer(m, make_loader(images), epochs=8, warmup_epochs=1, progress=False, teacher_temp=10.0,
                   warmup_teacher_temp=10.0, lr=0.3)
    with pytest.warns(RuntimeWarning, match="uniform collapse"):
        hist = t.fit()
    assert hist[-1]["teacher_entropy"] > 0.99 * math.log(m.out_dim)
