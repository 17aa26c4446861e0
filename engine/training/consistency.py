"""Consistency distillation (Song et al. 2023) in continuous VP time, gated like progressive.

The consistency function maps any point ``x_t`` of a probability-flow ODE trajectory to
its start, ``f(x_t, t) ~ x_eps``. It is parametrised as

    f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)

with the EDM scalings (Karras et al. 2022) shifted so that ``c_skip(eps) = 1`` and
``c_out(eps) = 0`` (Song et al. 2023, App. C). The noise level they use is that of the
variance-exploding variable ``x_t / alpha_t``, ``sigma_t / alpha_t``; ``x0_theta`` is the
U-Net's own data prediction (so ``c_out -> 1`` at high noise, as in Luo et al. 2023).
Training matches ``f_theta`` at ``t_{n+1}`` against an EMA target network ``f_theta-``
at ``t_n``, one teacher DDIM step earlier on an N-point Karras discretisation. The
math is in :mod:`engine.training.losses`; this module holds the model, its sampler and
the distillation driver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, ScheduleConfig
from engine.model.unet import UNet
from engine.sampling.diffusion import Denoise
from engine.sampling.schedules import Grid, karras_times
from engine.sampling.substeps import base_schedule, grid_arrays
from engine.training.losses import EPS, SIGMA_DATA, consistency_function, consistency_loss
from engine.training.quality_gate import QualityFn
from engine.training.stages import (
    DistillResult,
    Emit,
    Gate,
    Scorer,
    Snapshot,
    StagePlan,
    Trained,
    result_of,
    run_stages,
    teacher_snapshot,
)
from engine.training.student import (
    Labelled,
    StudentRun,
    copy_model,
    labelled,
    reparametrise,
    student_prediction,
    student_state,
    train_student,
)

__all__ = [
    "ConsistencyConfig",
    "ConsistencyModel",
    "consistency_distill",
    "discretisation",
    "sample_consistency",
    "sampling_schedule",
]


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"ConsistencyConfig.{name}={value!r}: {why}")


@dataclass(frozen=True)
class ConsistencyConfig:
    """Consistency distillation settings.

    ``num_scales`` is N of the Karras discretisation (Song et al. 2023 use N = 18 on
    CIFAR-10), ``target_decay`` the target network's EMA rate mu (0.95 there).
    ``target_steps`` is the sampling step count the gate scores, at ``sample_times``
    (default: trailing times 1, (K-1)/K, ...). ``rounds`` gated training rounds run in
    sequence; a failing round rolls back to the last passing one. ``teacher_steps`` is
    the teacher's DDIM step count for the baseline FID (stage 0).
    """

    teacher_steps: int = 64
    target_steps: int = 1
    num_scales: int = 18
    rounds: int = 1
    train_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-4
    target_decay: float = 0.95
    sigma_data: float = SIGMA_DATA
    rho: float = 7.0
    sample_times: tuple[float, ...] = ()
    reparam_steps: int = 300
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_times", tuple(float(t) for t in self.sample_times))
        _check(1 <= self.teacher_steps <= 4096, "teacher_steps", self.teacher_steps,
               "must be in [1, 4096]")
        _check(1 <= self.target_steps <= 16, "target_steps", self.target_steps, "must be in [1, 16]")
        _check(self.num_scales >= 2, "num_scales", self.num_scales, "must be >= 2")
        _check(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        _check(self.train_steps >= 1, "train_steps", self.train_steps, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _check(0.0 <= self.target_decay < 1.0, "target_decay", self.target_decay,
               "must be in [0, 1)")
        _check(self.sigma_data > 0, "sigma_data", self.sigma_data, "must be > 0")
        _check(self.rho > 0, "rho", self.rho, "must be > 0")
        _check(not self.sample_times or len(self.sample_times) == self.target_steps,
               "sample_times", self.sample_times, f"needs target_steps={self.target_steps} values")
        _check(self.reparam_steps >= 0, "reparam_steps", self.reparam_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")


class ConsistencyModel(nn.Module):
    """A U-Net wrapped as its consistency function; it predicts x0 (``prediction="x0"``)."""

    def __init__(self, unet: UNet, prediction: str, kind: str, sigma_data: float = SIGMA_DATA,
                 eps: float = EPS):
        super().__init__()
        self.unet = unet
        self.prediction, self.kind = prediction, kind
        self.sigma_data, self.eps = float(sigma_data), float(eps)

    @property
    def config(self) -> Any:
        """The U-Net's config: how many classes it is conditioned on."""
        return self.unet.config

    def __call__(self, x: mx.array, t: mx.array, y: mx.array | None = None) -> mx.array:
        unet = self.unet if y is None else Labelled(self.unet, y)
        return consistency_function(unet, x, t, self.prediction, self.kind, self.sigma_data,
                                    self.eps)


def sample_consistency(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                       eta: float = 1.0) -> mx.array:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): denoise, re-noise afresh.

    Same signature as :mod:`engine.sampling.samplers`; ``denoise`` wraps a
    :class:`ConsistencyModel` with ``prediction="x0"``. For 1 and 2 steps from t = 1 this
    equals ``sample_ddpm`` up to ``alpha(1)^2`` (1e-5), which is why distilled schedules
    name ``ddpm``.
    """
    keys = mx.random.split(key, max(grid.steps, 2))
    for i in range(grid.steps):
        x0, _ = denoise(x, float(grid.t[i]))
        if grid.sigma[i + 1] == 0.0:
            return x0
        x = float(grid.alpha[i + 1]) * x0 + float(grid.sigma[i + 1]) * mx.random.normal(
            x.shape, key=keys[i])
    return x


def discretisation(settings: ConsistencyConfig, kind: str) -> np.ndarray:
    """The N times ``eps = t_1 < ... < t_N = 1``, Karras-spaced in ``sigma/alpha`` (EDM eq. 5)."""
    ts = karras_times(settings.num_scales, kind, settings.rho)[::-1].copy()
    ts[0], ts[-1] = EPS, 1.0
    return ts


def sampling_schedule(config: Config, settings: ConsistencyConfig) -> ScheduleConfig:
    """How ``engine.sampling.samplers.generate`` samples a :class:`ConsistencyModel` at K steps."""
    schedule = replace(config.schedule, prediction="x0", sampler="ddpm", eta=1.0,
                       steps=settings.target_steps, spacing="trailing", timesteps=())
    if settings.sample_times:
        schedule = replace(schedule, spacing="explicit", timesteps=settings.sample_times)
    return schedule


def _ema_update(target: nn.Module, model: nn.Module, mu: float) -> dict:
    """Target network update ``theta- <- mu theta- + (1 - mu) theta`` (Song et al. 2023, Alg. 2)."""
    target.update(tree_map(lambda e, p: mu * e + (1 - mu) * p, target.parameters(),
                           model.parameters()))
    return target.parameters()


def consistency_distill(teacher: UNet, config: Config, images: np.ndarray, out: str | Path,
                        quality: QualityFn, settings: ConsistencyConfig = ConsistencyConfig(),
                        gate: Gate | None = None, measure_latency: bool = True,
                        emit: Emit = print, labels: np.ndarray | None = None) -> DistillResult:
    """Distil ``teacher`` into a consistency model sampled in ``settings.target_steps`` steps.

    Stage 0 scores the teacher by DDIM at ``teacher_steps``; each round is gated against
    it (or the previous round) and retried, and a failing round rolls back.

    Args:
        teacher: the trained U-Net (EMA weights); never modified.
        config: its config (architecture; ``schedule`` gives prediction and beta schedule).
        images: training images (N, H, W, C) float32 in [-1, 1].
        out: folder for the round checkpoints.
        quality: scores a model at a schedule, lower is better.
        settings: the discretisation, rounds and training settings.
        gate: the per-round quality gate (default :class:`Gate`).
        measure_latency: also record each round's batch-1 sampling latency.
        emit: receives one progress line per attempt.
        labels: the classes of ``images``, for a class-conditional teacher.

    Returns:
        The result; its ``model`` is a :class:`ConsistencyModel` (the teacher if round 1 fails).
    """
    out, kind, gate = Path(out), config.schedule.beta_schedule, gate or Gate()
    score = Scorer(quality, config, measure_latency)
    start, record0 = teacher_snapshot(teacher, config, base_schedule(config, settings.teacher_steps),
                                      score, out, "consistency", emit)
    prediction = student_prediction(config.schedule.prediction)
    first = reparametrise(teacher, config, images, settings.reparam_steps, settings.learning_rate,
                          settings.batch_size, settings.seed, labels=labels)
    grid = grid_arrays(discretisation(settings, kind), kind)
    schedule = sampling_schedule(config, settings)
    spec = {"prediction": prediction, "sigma_data": settings.sigma_data, "eps": EPS}

    def attempt(prev: Snapshot, plan: StagePlan, steps: int, lr: float) -> Trained:
        online = copy_model(first if plan.stage == 1 else prev.state.model)
        target = copy_model(online)
        if plan.stage > 1:
            target.update(prev.state.ema)
        target.eval()

        def loss_fn(model: nn.Module, x0: mx.array, key: mx.array, *y: mx.array) -> mx.array:
            nets = labelled((model, target, teacher), config, key, y)
            return consistency_loss(*nets, x0, key, grid, prediction,
                                    config.schedule.prediction, kind, settings.sigma_data)

        run = StudentRun(steps, lr, settings.batch_size, settings.seed + plan.stage,
                         settings.grad_clip, decay=False)
        opt, losses = train_student(
            online, loss_fn, images, run, frozen=[teacher.state, target.state],
            after_step=lambda: _ema_update(target, online, settings.target_decay), labels=labels)
        state = student_state(online, config, replace(schedule, prediction=prediction), run, opt,
                              ema=target.parameters(), ema_decay=settings.target_decay)
        model = ConsistencyModel(target, prediction, kind, settings.sigma_data, EPS)
        return Trained(state, model, schedule, losses, {"consistency": spec})

    plans = [StagePlan(r, settings.target_steps, settings.train_steps, settings.learning_rate)
             for r in range(1, settings.rounds + 1)]
    final, records = run_stages(start, plans, attempt, gate, score, out, "consistency", emit)
    return result_of("consistency", final, [record0, *records])
