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
from engine.model.unet import UNet
from engine.sampling.diffusion import diffusion_loss

VAL_BATCH = 256

Loss = Callable[[nn.Module, mx.array, mx.array], mx.array]
"""``loss_fn(model, x0, key) -> scalar``, ``x0`` a data batch (B, H, W, C), ``key`` its noise."""
Update = Callable[[mx.array, mx.array], mx.array]
"""``update(x0, key) -> loss``: one optimizer step on the model, from :func:`compiled_update`."""


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
    """AdamW with linear warm-up, then a constant learning rate or a cosine decay to zero."""
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


def _batch(images: np.ndarray, seed: int, step: int, size: int,
           stream: tuple[int, ...] = ()) -> mx.array:
    rng = np.random.default_rng([seed, *stream, step])
    return mx.array(images[rng.integers(0, len(images), size)])


def _ema_decay(decay: float, step: int) -> float:
    """EMA warm-up, ``min(decay, (1 + n) / (10 + n))``, so early EMA weights are usable."""
    return min(decay, (1 + step) / (10 + step))


LOSS_SCALE = {"float32": 1.0, "bfloat16": 1.0, "float16": 1024.0}
"""Static loss scale per compute dtype: fp16 gradients of a mean loss underflow without it."""


def _loss_and_grad(model: nn.Module, loss_fn: Loss, dtype: str) -> Callable:
    """``(x0, key) -> (loss, grads)`` w.r.t. the fp32 master weights, forward in ``dtype``.

    MLX has no autocast: the weights are cast inside the differentiated function, so the
    activations are low precision while the gradients (through ``astype``) and the
    optimizer state stay float32 (Micikevicius et al. 2018, mixed-precision training).
    """
    if dtype == "float32":
        return nn.value_and_grad(model, lambda x0, key: loss_fn(model, x0, key))
    low, scale = getattr(mx, dtype), LOSS_SCALE[dtype]

    def scaled_loss(params: dict, x0: mx.array, key: mx.array) -> mx.array:
        model.update(tree_map(lambda p: p.astype(low), params))
        return loss_fn(model, x0, key).astype(mx.float32) * scale

    grad_fn = mx.value_and_grad(scaled_loss)

    def loss_and_grad(x0: mx.array, key: mx.array) -> tuple[mx.array, dict]:
        master = model.trainable_parameters()
        loss, grads = grad_fn(master, x0, key)
        model.update(master)  # the optimizer steps the fp32 weights, never the casts
        return loss / scale, tree_map(lambda g: g / scale, grads)

    return loss_and_grad


def base_loss(config: Config) -> Loss:
    """The diffusion loss of ``config.schedule`` (its prediction target and beta schedule),
    weighted as ``config.train.loss_weight`` says."""
    return partial(diffusion_loss, prediction=config.schedule.prediction,
                   kind=config.schedule.beta_schedule, weighting=config.train.loss_weight)


def compiled_update(model: nn.Module, optimizer: optim.Optimizer, loss_fn: Loss,
                    grad_clip: float, dtype: str = "float32",
                    frozen: Sequence[Any] = ()) -> Update:
    """The training update: gradient of ``loss_fn``, norm clip, one optimizer step, compiled.

    Args:
        model: the module trained in place; ``optimizer`` is initialised on it.
        loss_fn: ``loss_fn(model, x0, key) -> scalar`` (see :data:`Loss`).
        grad_clip: global gradient-norm bound; 0 turns clipping off.
        dtype: compute dtype of the forward pass (see :func:`_loss_and_grad`).
        frozen: state of modules that ``loss_fn`` reads but does not train (a teacher, an
            EMA target); compiled as inputs, so that a change between steps is seen.

    Returns:
        ``update(x0, key) -> loss``.
    """
    loss_and_grad = _loss_and_grad(model, loss_fn, dtype)
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state + list(frozen), outputs=compiled_state)
    def step(x0: mx.array, key: mx.array) -> mx.array:
        loss, grads = loss_and_grad(x0, key)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    return step


def take_step(update: Update, images: np.ndarray, seed: int, step: int, batch_size: int,
              stream: tuple[int, ...] = ()) -> mx.array:
    """Run ``update`` once on the batch, noise key and dropout draws of ``(seed, step)``.

    ``stream`` tags a run's batch draws apart from a plain training run with the same seed
    (distillation uses its own, so a student never replays its teacher's batch order).
    """
    mx.random.seed(seed * 7919 + step)  # dropout draws from the global generator
    return update(_batch(images, seed, step, batch_size, stream), _step_key(seed, step))


def _compiled_step(state: TrainState) -> Update:
    cfg = state.config
    state.model.checkpointing = cfg.train.checkpointing
    return compiled_update(state.model, state.optimizer, base_loss(cfg), cfg.train.grad_clip,
                           cfg.train.dtype)


def validation_loss(model: nn.Module, config: Config, val: np.ndarray) -> float:
    """Loss on a fixed validation set with fixed noise, so values compare across steps.

    Evaluated in chunks of the training batch size, so validation never raises the
    training peak memory.
    """
    images, chunk = val[:VAL_BATCH], config.train.batch_size
    total = 0.0
    for i, start in enumerate(range(0, len(images), chunk)):
        x0 = mx.array(images[start:start + chunk])
        loss = diffusion_loss(model, x0, mx.random.key(12345 + i), config.schedule.prediction,
                              config.schedule.beta_schedule)
        total += float(loss.item()) * len(x0)
    return total / len(images)


def train(state: TrainState, images: np.ndarray, val: np.ndarray, until: int | None = None,
          callback: Callback | None = None,
          guard: Callable[[], AbstractContextManager[Any]] | None = None) -> TrainState:
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

    Returns:
        The same ``state``, advanced.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    tc = state.config.train
    until = tc.steps if until is None else min(until, tc.steps)
    step_fn = _compiled_step(state)
    start = time.perf_counter()
    while state.step < until:
        with guard() if guard is not None else nullcontext():
            point = _one_step(state, step_fn, images, val, start)
        if point is not None and callback is not None and callback(point) is False:
            break
    return state


def _one_step(state: TrainState, step_fn: Update, images: np.ndarray, val: np.ndarray,
              start: float) -> EvalPoint | None:
    """Step ``state`` once; returns the new :class:`EvalPoint` when validation was due."""
    tc, n, losses = state.config.train, state.step, state.pending_losses
    loss = take_step(step_fn, images, tc.seed, n, tc.batch_size)
    d = _ema_decay(tc.ema_decay, n)
    state.ema = tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, state.model.parameters())
    mx.eval(loss, state.ema, state.model.state, state.optimizer.state)
    value = float(loss.item())
    if not math.isfinite(value):
        raise TrainingDiverged(n + 1, value)
    losses.append(value)
    state.step = n + 1
    if state.step % tc.eval_every and state.step != tc.steps:
        return None
    point = EvalPoint(state.step, float(np.mean(losses)),
                      validation_loss(state.ema_model(), state.config, val),
                      time.perf_counter() - start)
    state.history.append(point)
    losses.clear()
    return point
