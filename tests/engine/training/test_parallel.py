"""Data-parallel training over CPU processes (engine.training.parallel): the one-process maths."""

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.device.peers import shares
from engine.sampling.diffusion import diffusion_loss
from engine.training import parallel
from engine.training.objective import base_loss
from engine.training.train import compiled_update, init_state, train, training_update

UNET = UNetConfig(image_size=8, channels=1, base_width=8, width_mults=(1, 2),
                  num_res_blocks=1, attn_levels=(1,), head_dim=8)


def _config(batch: int = 6, **train: object) -> Config:
    return Config(unet=UNET, schedule=ScheduleConfig(sampler="ddim", steps=4),
                  train=TrainConfig(batch_size=batch, steps=3, eval_every=3, warmup_steps=0,
                                    **train))


def _grad_peers() -> list:
    return [p for p in mp.active_children() if p.name.startswith("diffnas-grad")]


def _batch(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32))


@pytest.mark.parametrize(("weighting", "classes"), [("none", 0), ("min_snr", 3)])
def test_the_shares_of_a_batch_sum_to_its_loss(weighting, classes):
    from engine.model.unet import UNet

    mx.random.seed(0)
    model = UNet(UNetConfig(**{**UNET.__dict__, "num_classes": classes}))
    x0, key = _batch(7), mx.random.key(3)
    labels = {} if not classes else {"labels": mx.array([0, 1, 2, 0, 1, 2, 0]),
                                     "label_dropout": 0.5}
    whole = diffusion_loss(model, x0, key, "eps", "cosine", weighting, **labels)
    parts = [diffusion_loss(model, x0, key, "eps", "cosine", weighting, rows=rows, **labels)
             for rows in shares(7, 3)]
    assert shares(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert abs(float(sum(parts)) - float(whole)) < 1e-6 * abs(float(whole))


def test_two_processes_train_the_weights_one_process_does():
    # Plain SGD: Adam's step is about lr wherever a gradient is float noise around zero,
    # which would hide a wrong gradient as well as it shows a right one.
    cfg = _config()
    serial, split = init_state(cfg), init_state(cfg)
    serial.optimizer, split.optimizer = optim.SGD(0.5), optim.SGD(0.5)
    one = compiled_update(serial.model, serial.optimizer, base_loss(cfg), cfg.train.grad_clip)
    two = parallel.DataParallelUpdate(split.model, split.optimizer, cfg, 2)
    try:
        assert two.processes == 2
        for step in range(3):
            x0, key = _batch(6, step), mx.random.key(step)
            a, b = one(x0, key), two(x0, key)
            mx.eval(a, b, serial.model.state, split.model.state)
            assert abs(a.item() - b.item()) < 1e-5
    finally:
        two.close()
    before = dict(tree_flatten(init_state(cfg).model.parameters()))
    want, got = dict(tree_flatten(serial.model.parameters())), dict(tree_flatten(split.model.parameters()))
    moved = max(float(mx.abs(want[k] - before[k]).max()) for k in want)
    gap = max(float(mx.abs(want[k] - got[k]).max()) for k in want)
    assert moved > 1e-3  # the steps did change the weights
    assert gap < 1e-3 * moved, (gap, moved)
    assert not _grad_peers()  # close() ended the peer


def test_train_splits_its_steps_over_the_thread_budget(monkeypatch):
    cfg = _config(batch=4)
    images, val = np.asarray(_batch(32, 1)), np.asarray(_batch(8, 2))
    monkeypatch.delenv(parallel.ENV, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    alone = train(init_state(cfg), images, val)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    update = training_update(init_state(cfg))
    assert isinstance(update, parallel.DataParallelUpdate)
    update.close()
    split = train(init_state(cfg), images, val)
    assert split.step == alone.step == 3
    assert [p.val_loss for p in split.history] == pytest.approx(
        [p.val_loss for p in alone.history], rel=1e-4)
    assert not _grad_peers()


@contextmanager
def _update_with_a_dead_peer(n: int, dead: int) -> Iterator[parallel.DataParallelUpdate]:
    """An update over ``n`` processes that took one step, then lost peer ``dead`` (1-based)."""
    cfg = _config()
    state = init_state(cfg)
    update = parallel.DataParallelUpdate(state.model, state.optimizer, cfg, n)
    try:
        mx.eval(update(_batch(6), mx.random.key(0)))
        peer = update._peers[dead - 1].process
        peer.kill()
        peer.join()
        yield update
    finally:
        update.close()


def test_a_dead_peer_is_named():
    with (_update_with_a_dead_peer(2, 1) as update,
          pytest.raises(RuntimeError, match=r"peer process diffnas-grad-1 \(pid \d+\) died")):
        update(_batch(6), mx.random.key(1))


def test_the_process_count_follows_the_budget_and_rejects_bad_values(monkeypatch):
    monkeypatch.delenv(parallel.ENV, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert parallel.processes_for(_config()) == 2
    assert parallel.processes_for(_config(batch=1)) == 1  # never more than the rows
    monkeypatch.setenv(parallel.ENV, "1")
    assert parallel.processes_for(_config()) == 1
    for bad in ("two", "0"):
        monkeypatch.setenv(parallel.ENV, bad)
        with pytest.raises(ValueError, match=parallel.ENV):
            parallel.processes_for(_config())


def test_memory_measurements_keep_the_whole_job_in_one_process(monkeypatch):
    """A peak measured with the work split over peers would count this process's share."""
    from engine.device.bench import sampling_peak_mb
    from engine.device.memory.limits import enforce_limit
    from engine.device.peers import one_process
    from engine.model.unet import UNet
    from engine.sampling.samplers import sample_processes

    monkeypatch.delenv(parallel.ENV, raising=False)
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "1")  # the stream split has peaks of its own
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    cfg, schedule = _config(batch=8), ScheduleConfig(sampler="ddim", steps=2)
    model = UNet(UNET)
    assert parallel.processes_for(cfg) == sample_processes(model, schedule, 8) == 2
    for block in (one_process(), enforce_limit(10_000)):
        with block:
            assert parallel.processes_for(cfg) == sample_processes(model, schedule, 8) == 1

    def peak() -> float:  # the least of three: MLX's main thread running ahead only adds
        return min(sampling_peak_mb(model, Config(unet=UNET, schedule=schedule), 8)
                   for _ in range(3))

    split = peak()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    whole = peak()
    # Measured: about 1.9 MB whole, 1.0 MB when the peer draws half the rows. A busy
    # machine only raises a peak (CI once read 2.17 MB against 1.72), so the bound is
    # one-sided: a split would show as about half.
    assert split > 0.75 * whole, (split, whole)


def test_a_failed_step_ends_the_peers_so_no_answer_is_left_behind():
    """Peer 1 is sent its share, then peer 2 is found dead: peer 1's answer would wait in
    its pipe and be read as the next step's gradient, so every peer is ended instead."""
    with _update_with_a_dead_peer(3, 2) as update:
        with pytest.raises(RuntimeError, match="diffnas-grad-2"):
            update(_batch(6), mx.random.key(1))
        assert not _grad_peers()
        with pytest.raises(RuntimeError, match="closed"):
            update(_batch(6), mx.random.key(2))
