"""Measured peaks of a training step and of sampling: what the memory model is fitted to.

Unlike :func:`engine.device.bench.training_peak_mb` and
:func:`engine.device.bench.sampling_peak_mb`, which report the process's whole peak for a
benchmark record, these count only what the run adds on top of the memory the process
already holds (after a garbage collection), and sampling builds its model inside the
measured window. So the numbers do not depend on what a test or benchmark allocated
earlier, and :mod:`engine.device.memory.fit` and the held-out checks compare like with like.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mlx.core as mx
import numpy as np

from engine.config import Config
from engine.device.memory.limits import release
from engine.device.memory.model import MB
from engine.device.peers import one_process
from engine.model.unet import UNet
from engine.sampling.samplers import generate
from engine.training.train import init_state, stand_in_labels, train


def _measured_peak_mb(fn: Any) -> float:
    """Peak MB that ``fn`` added on top of what the process already held (all of ``fn`` in
    this process: a split over peers would leave their shares uncounted)."""
    release()
    held = mx.get_active_memory()
    with one_process():
        fn()
    mx.synchronize()
    return (mx.get_peak_memory() - held) / MB


def measure_train_step_mb(config: Config, batch: int | None = None, steps: int = 2) -> float:
    """Measured peak of building the state and ``steps`` compiled training steps.

    Like :func:`engine.device.bench.training_peak_mb`, this runs no validation forward.

    Args:
        config: the candidate, trained in its own dtype and checkpointing mode.
        batch: training batch (default ``config.train.batch_size``).
        steps: training steps to run.

    Returns:
        The peak in MB above what the process held before.
    """
    batch = batch or config.train.batch_size
    cfg = replace(config, train=replace(config.train, batch_size=batch, steps=10**6,
                                        eval_every=10**6))
    u = cfg.unet
    images = np.zeros((batch, u.image_size, u.image_size, u.channels), np.float32)
    labels = stand_in_labels(cfg, batch, 1)
    return _measured_peak_mb(lambda: train(init_state(cfg), images, images[:1], until=steps,
                                           labels=labels))


def measure_sampling_mb(config: Config, batch: int) -> float:
    """Measured peak of building a model and drawing ``batch`` images (weights included).

    Args:
        config: the candidate; its schedule sets the sampler and step count.
        batch: images drawn at once.

    Returns:
        The peak in MB above what the process held before.
    """
    u = config.unet

    def run() -> None:
        model = UNet(u)
        mx.eval(model.parameters())
        generate(model, config.schedule, batch, 0, u.image_size, u.channels)

    return _measured_peak_mb(run)
