"""Progressive distillation (Salimans & Ho 2022, Alg. 2), gated stage by stage.

Each stage halves a DDIM sampler's step count, 64 -> 32 -> ... -> 4: the student,
initialised from its teacher, learns to match two teacher DDIM steps with one of its
own, and the next stage's teacher is this stage's student. Stages are gated and rolled
back by :mod:`engine.training.stages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.config import Config
from engine.model.unet import UNet
from engine.sampling.substeps import base_schedule, schedule_grid, sub_schedule
from engine.training.losses import progressive_loss
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
    StudentRun,
    copy_model,
    labelled,
    reparametrise,
    student_prediction,
    student_state,
    train_student,
)

__all__ = ["ProgressiveConfig", "progressive_distill"]

WEIGHTS = ("truncated_snr", "snr_plus_one")
SPACINGS = ("trailing", "uniform", "quadratic", "karras")


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"ProgressiveConfig.{name}={value!r}: {why}")


@dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive distillation from ``teacher_steps`` down to ``target_steps`` (powers of 2 apart).

    ``weight`` is the paper's x-space loss weight: ``truncated_snr`` = max(SNR, 1) or
    ``snr_plus_one`` = SNR + 1 (Salimans & Ho 2022, Sec. 4). ``stage_learning_rates[i]``
    and ``stage_train_steps[i]`` override ``learning_rate`` and ``train_steps`` for stage
    ``i + 1`` (early stages, where two steps are nearly one, need less training). An
    eps-prediction teacher is first converted to v-prediction in ``reparam_steps`` (eps is
    unstable at few steps, Sec. 4).
    """

    teacher_steps: int = 64
    target_steps: int = 4
    train_steps: int = 500
    batch_size: int = 64
    learning_rate: float = 2e-4
    stage_learning_rates: tuple[float, ...] = ()
    stage_train_steps: tuple[int, ...] = ()
    weight: str = "truncated_snr"
    spacing: str = "trailing"
    reparam_steps: int = 300
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_learning_rates",
                           tuple(float(v) for v in self.stage_learning_rates))
        object.__setattr__(self, "stage_train_steps", tuple(int(v) for v in self.stage_train_steps))
        _check(1 <= self.target_steps < self.teacher_steps <= 4096, "target_steps",
               self.target_steps, f"must be in [1, teacher_steps={self.teacher_steps})")
        ratio = self.teacher_steps // self.target_steps
        _check(self.teacher_steps % self.target_steps == 0 and ratio & (ratio - 1) == 0,
               "teacher_steps", self.teacher_steps,
               f"must be target_steps={self.target_steps} times a power of 2")
        _check(self.train_steps >= 1, "train_steps", self.train_steps, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _check(all(v > 0 for v in self.stage_learning_rates), "stage_learning_rates",
               self.stage_learning_rates, "must all be > 0")
        _check(all(v >= 1 for v in self.stage_train_steps), "stage_train_steps",
               self.stage_train_steps, "must all be >= 1")
        _check(self.weight in WEIGHTS, "weight", self.weight, f"must be one of {WEIGHTS}")
        _check(self.spacing in SPACINGS, "spacing", self.spacing, f"must be one of {SPACINGS}")
        _check(self.reparam_steps >= 0, "reparam_steps", self.reparam_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")

    @property
    def stage_steps(self) -> tuple[int, ...]:
        """Student step counts, one per stage: N/2, N/4, ..., target."""
        out, k = [], self.teacher_steps
        while k > self.target_steps:
            k //= 2
            out.append(k)
        return tuple(out)

    def plan(self, stage: int) -> tuple[int, float]:
        """``(train_steps, learning_rate)`` of stage ``stage`` (1-based)."""
        steps, lrs = self.stage_train_steps, self.stage_learning_rates
        return (steps[stage - 1] if stage <= len(steps) else self.train_steps,
                lrs[stage - 1] if stage <= len(lrs) else self.learning_rate)


def progressive_distill(teacher: UNet, config: Config, images: np.ndarray, out: str | Path,
                        quality: QualityFn, settings: ProgressiveConfig = ProgressiveConfig(),
                        gate: Gate | None = None, measure_latency: bool = True,
                        emit: Emit = print, labels: np.ndarray | None = None) -> DistillResult:
    """Distil ``teacher`` from ``settings.teacher_steps`` to ``settings.target_steps`` DDIM steps.

    Args:
        teacher: the trained U-Net (EMA weights); never modified.
        config: its config (architecture; ``schedule`` gives prediction and beta schedule).
        images: training images (N, H, W, C) float32 in [-1, 1].
        out: folder for the stage checkpoints.
        quality: scores a model at a schedule, lower is better (see
            :func:`engine.training.quality_gate.fid_quality`).
        settings: the stage plan and training settings.
        gate: the per-stage quality gate (default :class:`Gate`).
        measure_latency: also record each stage's batch-1 sampling latency.
        emit: receives one progress line per attempt.
        labels: the classes of ``images``, for a class-conditional teacher.

    Returns:
        The last passing stage's student; the teacher itself if the first stage fails.
    """
    out, gate = Path(out), gate or Gate()
    base = base_schedule(config, settings.teacher_steps, settings.spacing)
    score = Scorer(quality, config, measure_latency)
    start, record0 = teacher_snapshot(teacher, config, base, score, out, "progressive", emit)
    prediction = student_prediction(config.schedule.prediction)
    first = reparametrise(teacher, config, images, settings.reparam_steps, settings.learning_rate,
                          settings.batch_size, settings.seed, settings.weight, labels)

    def attempt(prev: Snapshot, plan: StagePlan, steps: int, lr: float) -> Trained:
        init = first if plan.stage == 1 else prev.state.model
        student, schedule = copy_model(init), sub_schedule(base, plan.steps, prediction)
        prev.model.eval()
        grid = schedule_grid(prev.schedule)

        def loss_fn(model: nn.Module, x0: mx.array, key: mx.array, *y: mx.array) -> mx.array:
            s, t = labelled((model, prev.model), config, key, y)
            return progressive_loss(s, t, x0, key, grid, prediction, prev.schedule.prediction,
                                    settings.weight)

        run = StudentRun(steps, lr, settings.batch_size, settings.seed + plan.stage,
                         settings.grad_clip)
        opt, losses = train_student(student, loss_fn, images, run, frozen=[prev.model.state],
                                    labels=labels)
        student.eval()
        return Trained(student_state(student, config, schedule, run, opt), student, schedule,
                       losses)

    plans = [StagePlan(i, k, *settings.plan(i)) for i, k in enumerate(settings.stage_steps, 1)]
    final, records = run_stages(start, plans, attempt, gate, score, out, "progressive", emit)
    return result_of("progressive", final, [record0, *records])
