"""Students: a copy of the teacher, trained on a distillation loss through train.py's update.

A student run is the base training step with another loss: the same compiled update
(:func:`engine.training.train.compiled_update`) and the same ``(seed, step)`` draws
(:func:`engine.training.train.take_step`), with AdamW annealed to 0 and no EMA of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, ScheduleConfig, TrainConfig
from engine.model.unet import UNet
from engine.sampling.diffusion import drop_labels
from engine.training.losses import reparam_loss
from engine.training.train import Loss, TrainState, compiled_update, take_step

__all__ = [
    "Labelled",
    "StudentRun",
    "copy_model",
    "labelled",
    "reparametrise",
    "student_prediction",
    "student_state",
    "train_student",
]

BATCH_STREAM = (7,)
"""Student batches come from their own ``(seed, 7, step)`` stream, not ``(seed, step)``."""


class Labelled:
    """A class-conditional network with a batch's labels bound: ``Labelled(net, y)(x, t)`` is
    ``net(x, t, y)``, so the distillation losses, which call ``net(x, t)``, need no labels."""

    def __init__(self, net: Any, labels: mx.array):
        self.net, self.labels = net, labels

    def __call__(self, x: mx.array, t: mx.array) -> mx.array:
        return self.net(x, t, self.labels)  # type: ignore[no-any-return]


def labelled(nets: Sequence[Any], config: Config, key: mx.array,
             labels: Sequence[mx.array]) -> tuple[Any, ...]:
    """``nets`` (student, teacher, ...) bound to one batch's ``labels``, the same labels for
    all, ``config.train.label_dropout`` of them dropped to the null label (drawn from
    ``key``), so that the student also learns the unconditional prediction guidance needs.
    Without labels (an unconditional network) the nets are returned as they are."""
    if not labels:
        return tuple(nets)
    *_, k_drop = mx.random.split(key, 3)  # unpacked, not [2]: see diffusion_loss
    y = drop_labels(labels[0], k_drop, config.train.label_dropout, config.unet.num_classes)
    return tuple(Labelled(n, y) for n in nets)


@dataclass(frozen=True)
class StudentRun:
    """One training run: steps, learning rate (annealed linearly to 0 when ``decay``), batch."""

    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    grad_clip: float
    decay: bool = True


def train_student(model: UNet, loss_fn: Loss, images: np.ndarray, run: StudentRun,
                  frozen: Sequence[Any] = (), after_step: Callable[[], Any] | None = None,
                  labels: np.ndarray | None = None) -> tuple[optim.Optimizer, list[float]]:
    """Minimise ``loss_fn(model, x0, key[, y])`` over ``model`` for ``run.steps`` steps.

    Args:
        model: the student, trained in place.
        loss_fn: a distillation loss with its teacher (and target) bound in.
        images: training images (N, H, W, C) float32 in [-1, 1].
        run: steps, learning rate, batch size, seed and gradient clip.
        frozen: state of the networks ``loss_fn`` reads (teacher, target network).
        after_step: returns arrays to evaluate with each step (a target EMA update).
        labels: the classes of ``images`` (N,), passed with each batch as ``y``, for a
            class-conditional student.

    Returns:
        The optimizer and the loss of every step; a non-finite loss stops training and
        is the last entry.
    """
    lr: float | Callable = run.learning_rate
    if run.decay:
        lr = optim.linear_schedule(run.learning_rate, 0.0, run.steps)
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.0)
    opt.init(model.trainable_parameters())
    update = compiled_update(model, opt, loss_fn, run.grad_clip, frozen=frozen)
    losses: list[float] = []
    for n in range(run.steps):
        value = take_step(update, images, run.seed, n, run.batch_size, BATCH_STREAM, labels)
        extra = after_step() if after_step is not None else None
        mx.eval(value, model.state, opt.state, extra)
        losses.append(float(np.array(value)))
        if not math.isfinite(losses[-1]):
            break
    return opt, losses


def copy_model(model: UNet) -> UNet:
    """A new U-Net with the same weights (MLX arrays are immutable, so sharing is safe)."""
    out = UNet(model.config)
    out.update(tree_map(lambda p: p, model.parameters()))
    return out


def student_prediction(teacher_prediction: str) -> str:
    """eps is unstable at few steps (alpha -> 0 at t = 1); v and x0 are kept as they are."""
    return "v" if teacher_prediction == "eps" else teacher_prediction


def reparametrise(teacher: UNet, config: Config, images: np.ndarray, steps: int,
                  learning_rate: float, batch_size: int = 64, seed: int = 0,
                  weight: str = "truncated_snr", labels: np.ndarray | None = None) -> UNet:
    """A copy of ``teacher`` predicting v instead of eps, trained to match its x0.

    Returns ``teacher`` itself when its prediction needs no change.
    """
    prediction = config.schedule.prediction
    if student_prediction(prediction) == prediction or steps == 0:
        return teacher
    student = copy_model(teacher)
    teacher.eval()

    def loss_fn(model: nn.Module, x0: mx.array, key: mx.array, *y: mx.array) -> mx.array:
        s, t = labelled((model, teacher), config, key, y)
        return reparam_loss(s, t, x0, key, student_prediction(prediction), prediction,
                            config.schedule.beta_schedule, weight)

    run = StudentRun(steps, learning_rate, batch_size, seed, 1.0)
    train_student(student, loss_fn, images, run, frozen=[teacher.state], labels=labels)
    return student


def student_state(model: UNet, config: Config, schedule: ScheduleConfig, run: StudentRun,
                  optimizer: optim.Optimizer, ema: dict | None = None,
                  ema_decay: float = 0.0) -> TrainState:
    """A :class:`TrainState` for a distilled model, so ``engine.io.checkpoint`` can checkpoint it."""
    train = TrainConfig(steps=max(run.steps, 1), batch_size=run.batch_size,
                        learning_rate=run.learning_rate, warmup_steps=0, ema_decay=ema_decay,
                        grad_clip=run.grad_clip, seed=run.seed, eval_every=max(run.steps, 1))
    ema = ema if ema is not None else tree_map(lambda p: p, model.parameters())
    return TrainState(replace(config, schedule=schedule, train=train), model, ema, optimizer,
                      step=run.steps)
