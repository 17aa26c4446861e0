"""Training: a plain loss function plus one compiled AdamW update, with EMA weights.

Every step draws its batch and noise from ``(seed, step)`` alone, so training that is
stopped, checkpointed and resumed follows the uninterrupted loss curve exactly. The
update (:func:`compiled_update`) takes any :data:`Loss`: the diffusion loss here, and
the distillation losses of :mod:`engine.training.losses` with their teachers bound in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, TrainConfig
from engine.device import compile_mode
from engine.model.unet import UNet
from engine.sampling.diffusion import diffusion_loss
from engine.training import parallel
from engine.training.fused import FlatAdamW, FusedAdamW, clip_and_update, ema_update
from engine.training.objective import Loss, base_loss, loss_and_grad

VAL_BATCH = 256

Update = Callable[..., mx.array]
"""``update(x0, key[, labels]) -> loss``: one optimizer step on the model, from
:func:`compiled_update`."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; raised instead of continuing with garbage."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss={loss}")
        self.step = step
        self.loss = loss


@dataclass(frozen=True)
class EvalPoint:
    """Train loss (mean since the previous point) and validation loss at ``step``."""

    step: int
    train_loss: float
    val_loss: float
    elapsed_s: float


Callback = Callable[[EvalPoint], bool | None]
"""Called every ``eval_every`` steps; returning ``False`` stops training (a prune)."""


@dataclass
class TrainState:
    """Everything training needs to continue: weights, EMA weights, optimizer, step."""

    config: Config
    model: UNet
    ema: dict
    optimizer: optim.Optimizer
    step: int = 0
    history: list[EvalPoint] = field(default_factory=list)
    pending_losses: list[float] = field(default_factory=list)  # since the last EvalPoint

    def ema_model(self) -> UNet:
        """A fresh U-Net carrying the EMA weights (what sampling uses)."""
        model = UNet(self.config.unet)
        model.update(self.ema)
        return model


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warm-up, then a constant learning rate or a cosine decay to zero.

    Where graphs are not compiled (:mod:`engine.training.fused`): one fused kernel per array
    in the ``fused`` compile mode, else one update over all arrays joined (``off``).
    """
    if compile_mode.fused_updates():
        return FusedAdamW(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
    if not compile_mode.whole_graph():
        return FlatAdamW(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
    return optim.AdamW(learning_rate=learning_rate_schedule(cfg), weight_decay=cfg.weight_decay,
                       bias_correction=True)


def learning_rate_schedule(cfg: TrainConfig) -> float | Callable:
    """The learning rate by optimizer step: ``cfg.warmup_steps`` of linear warm-up, then
    ``cfg.learning_rate`` held (``lr_decay = "none"``) or decayed to zero at ``cfg.steps``
    along half a cosine (``"cosine"``)."""
    peak = cfg.learning_rate
    warmup = min(cfg.warmup_steps, cfg.steps - 1) if cfg.lr_decay == "cosine" else cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        after: float | Callable = optim.cosine_decay(peak, cfg.steps - warmup, 0.0)
    elif warmup > 0:
        after = optim.linear_schedule(peak, peak, 1)
    else:
        return peak
    if warmup <= 0:
        return after
    return optim.join_schedules([optim.linear_schedule(peak / warmup, peak, warmup), after],
                                [warmup])


def init_state(config: Config) -> TrainState:
    """A new model (seeded by ``config.train.seed``), its EMA copy and a fresh optimizer."""
    mx.random.seed(config.train.seed)
    model = UNet(config.unet)
    mx.eval(model.parameters())
    ema = tree_map(lambda p: mx.array(p), model.parameters())
    optimizer = make_optimizer(config.train)
    optimizer.init(model.trainable_parameters())
    return TrainState(config, model, ema, optimizer)


def _step_key(seed: int, step: int) -> mx.array:
    return mx.random.key((seed * 1_000_003 + step) % (2**63))


def _batch(images: np.ndarray, seed: int, step: int, size: int, stream: tuple[int, ...] = (),
           labels: np.ndarray | None = None) -> list[mx.array]:
    """``[images]`` or ``[images, labels]`` of the step's draw (the same indices for both)."""
    rng = np.random.default_rng([seed, *stream, step])
    idx = rng.integers(0, len(images), size)
    if labels is None:
        return [mx.array(images[idx])]
    return [mx.array(images[idx]), mx.array(labels[idx].astype(np.int32))]


def _ema_decay(decay: float, step: int) -> float:
    """EMA warm-up, ``min(decay, (1 + n) / (10 + n))``, so early EMA weights are usable."""
    return min(decay, (1 + step) / (10 + step))


def compiled_update(model: nn.Module, optimizer: optim.Optimizer, loss_fn: Loss,
                    grad_clip: float, dtype: str = "float32",
                    frozen: Sequence[Any] = ()) -> Update:
    """The training update: gradient of ``loss_fn``, norm clip, one optimizer step, compiled.

    Args:
        model: the module trained in place; ``optimizer`` is initialised on it.
        loss_fn: ``loss_fn(model, x0, key) -> scalar`` (see :data:`Loss`).
        grad_clip: global gradient-norm bound; 0 turns clipping off.
        dtype: compute dtype of the forward pass (see
            :func:`engine.training.objective.loss_and_grad`).
        frozen: state of modules that ``loss_fn`` reads but does not train (a teacher, an
            EMA target); compiled as inputs, so that a change between steps is seen.

    Returns:
        ``update(x0, key) -> loss``.
    """
    value_and_grad = loss_and_grad(model, loss_fn, dtype)
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(compile_mode.whole, inputs=compiled_state + list(frozen), outputs=compiled_state)
    def step(x0: mx.array, key: mx.array, *labels: mx.array) -> mx.array:
        loss, grads = value_and_grad(x0, key, *labels)
        clip_and_update(optimizer, model, grads, grad_clip)
        return loss

    return step


def take_step(update: Update, images: np.ndarray, seed: int, step: int, batch_size: int,
              stream: tuple[int, ...] = (), labels: np.ndarray | None = None) -> mx.array:
    """Run ``update`` once on the batch, noise key and dropout draws of ``(seed, step)``.

    ``stream`` tags a run's batch draws apart from a plain training run with the same seed
    (distillation uses its own, so a student never replays its teacher's batch order).
    ``labels`` (N,), the images' classes, go with the batch to a class-conditional update.
    """
    mx.random.seed(seed * 7919 + step)  # dropout draws from the global generator
    x0, *y = _batch(images, seed, step, batch_size, stream, labels)
    return update(x0, _step_key(seed, step), *y)


def training_update(state: TrainState) -> Update:
    """The update that trains ``state``: :func:`compiled_update` of the config's diffusion
    loss, or, with a budget of several CPU cores, the same step split over as many
    processes (:class:`engine.training.parallel.DataParallelUpdate`; ``close()`` it)."""
    cfg = state.config
    state.model.checkpointing = cfg.train.checkpointing
    n = parallel.processes_for(cfg)
    if n > 1:
        return parallel.DataParallelUpdate(state.model, state.optimizer, cfg, n)
    return compiled_update(state.model, state.optimizer, base_loss(cfg), cfg.train.grad_clip,
                           cfg.train.dtype)


def validation_loss(model: nn.Module, config: Config, val: np.ndarray,
                    val_labels: np.ndarray | None = None) -> float:
    """Loss on a fixed validation set with fixed noise, so values compare across steps.

    Evaluated in chunks of the training batch size, so validation never raises the
    training peak memory. A class-conditional network is scored on ``val_labels`` (none
    dropped), or unconditionally (the null label) when there are none.
    """
    images, chunk = val[:VAL_BATCH], config.train.batch_size
    total = 0.0
    for i, start in enumerate(range(0, len(images), chunk)):
        x0 = mx.array(images[start:start + chunk])
        y = None
        if config.unet.num_classes > 0 and val_labels is not None:
            y = mx.array(val_labels[start:start + chunk].astype(np.int32))
        loss = diffusion_loss(model, x0, mx.random.key(12345 + i), config.schedule.prediction,
                              config.schedule.beta_schedule, labels=y)
        total += float(loss.item()) * len(x0)
    return total / len(images)


def train(state: TrainState, images: np.ndarray, val: np.ndarray, until: int | None = None,
          callback: Callback | None = None,
          guard: Callable[[], AbstractContextManager[Any]] | None = None,
          labels: tuple[np.ndarray, np.ndarray] | None = None) -> TrainState:
    """Train ``state`` in place up to step ``until`` (default: ``config.train.steps``).

    Args:
        state: from :func:`init_state` or :func:`engine.io.checkpoint.load_checkpoint`.
        images: training images, (N, H, W, C) float32 in [-1, 1].
        val: validation images, same layout; the loss is reported on the EMA weights.
        until: stop after this many total steps (for training in rungs).
        callback: receives an :class:`EvalPoint` every ``eval_every`` steps and at the last step;
            returning ``False`` stops training early.
        guard: each step (with its validation, if due) runs inside ``guard()``, for
            example a lock that other processes on the device share.
        labels: ``(train labels, validation labels)``, the classes of ``images`` and ``val``;
            a class-conditional network (``num_classes > 0``) needs them.

    Returns:
        The same ``state``, advanced.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        ValueError: a class-conditional network without labels, or a label out of its range.
    """
    tc = state.config.train
    until = tc.steps if until is None else min(until, tc.steps)
    check_labels(state.config, labels, len(images), len(val))
    step_fn = training_update(state)
    start = time.perf_counter()
    try:
        while state.step < until:
            with guard() if guard is not None else nullcontext():
                point = _one_step(state, step_fn, images, val, start, labels)
            if point is not None and callback is not None and callback(point) is False:
                break
    finally:
        if isinstance(step_fn, parallel.DataParallelUpdate):
            step_fn.close()
    return state


def check_labels(config: Config, labels: tuple[np.ndarray, np.ndarray] | None,
                 n_train: int, n_val: int) -> None:
    """Raise ``ValueError`` unless ``labels`` fit ``config``'s network and the two image sets."""
    classes = config.unet.num_classes
    if classes == 0:
        return
    if labels is None:
        raise ValueError(f"UNetConfig.num_classes={classes}: the dataset has no labels")
    for name, y, n in (("training", labels[0], n_train), ("validation", labels[1], n_val)):
        if y.shape != (n,):
            raise ValueError(f"{name} labels: shape {y.shape} for {n} images")
        if n and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"UNetConfig.num_classes={classes}: {name} labels span "
                             f"[{y.min()}, {y.max()}]")


def stand_in_labels(config: Config, n_train: int, n_val: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Class 0 for every image, for a class-conditional ``config``, else None: what speed
    and memory probes train on (the label's value changes neither)."""
    if config.unet.num_classes == 0:
        return None
    return np.zeros(n_train, np.int64), np.zeros(n_val, np.int64)


def _one_step(state: TrainState, step_fn: Update, images: np.ndarray, val: np.ndarray,
              start: float, labels: tuple[np.ndarray, np.ndarray] | None = None
              ) -> EvalPoint | None:
    """Step ``state`` once; returns the new :class:`EvalPoint` when validation was due."""
    tc, n, losses = state.config.train, state.step, state.pending_losses
    # An unconditional network ignores the dataset's labels.
    y_train, y_val = labels if labels and state.config.unet.num_classes else (None, None)
    loss = take_step(step_fn, images, tc.seed, n, tc.batch_size, labels=y_train)
    d = _ema_decay(tc.ema_decay, n)
    if compile_mode.fused_updates():  # one fused kernel per array (engine.training.fused)
        state.ema = ema_update(state.ema, state.model.parameters(), d)
    else:
        state.ema = tree_map(lambda e, p: d * e + (1 - d) * p, state.ema,
                             state.model.parameters())
    mx.eval(loss, state.ema, state.model.state, state.optimizer.state)
    value = float(loss.item())
    if not math.isfinite(value):
        raise TrainingDiverged(n + 1, value)
    losses.append(value)
    state.step = n + 1
    if state.step % tc.eval_every and state.step != tc.steps:
        return None
    point = EvalPoint(state.step, float(np.mean(losses)),
                      validation_loss(state.ema_model(), state.config, val, y_val),
                      time.perf_counter() - start)
    state.history.append(point)
    losses.clear()
    return point
