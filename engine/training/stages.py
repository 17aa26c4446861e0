"""Gated distillation stages with rollback, shared by progressive and consistency distillation.

Every stage is gated. Its student is scored by an injectable quality function (FID for
real use, a cheap proxy in tests); a stage whose score exceeds ``max_fid_ratio`` times
the baseline is retried with more training steps and a lower learning rate, and a stage
that still fails rolls the result back to the last stage that passed. Every attempt
keeps its checkpoint (``stage<i>-<k>steps-a<attempt>/``) and a :class:`StageRecord`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, ScheduleConfig
from engine.device.bench import sampling_latency
from engine.io.checkpoint import save_checkpoint
from engine.model.unet import UNet
from engine.training.quality_gate import Quality, QualityFn
from engine.training.train import TrainState

__all__ = [
    "Attempt",
    "DistillResult",
    "Emit",
    "Gate",
    "Scorer",
    "Snapshot",
    "StagePlan",
    "StageRecord",
    "Trained",
    "result_of",
    "run_stages",
    "teacher_snapshot",
]

BASELINES = ("previous", "teacher")

Emit = Callable[[str], None]


@dataclass(frozen=True)
class Gate:
    """Pass a stage when its FID is finite and at most ``max_fid_ratio`` x the baseline.

    The baseline is the previous passing stage (``previous``; the teacher at its N steps
    for the first stage) or always the teacher (``teacher``). A failing stage is retried
    ``max_retries`` times, attempt ``a`` with ``retry_steps_factor**a`` times the training
    steps and ``retry_lr_factor**a`` times the learning rate.
    """

    max_fid_ratio: float = 1.10
    max_retries: int = 2
    retry_steps_factor: float = 2.0
    retry_lr_factor: float = 0.5
    baseline: str = "previous"

    def __post_init__(self) -> None:
        for ok, name, why in (
                (self.max_fid_ratio > 0, "max_fid_ratio", "must be > 0"),
                (self.max_retries >= 0, "max_retries", "must be >= 0"),
                (self.retry_steps_factor >= 1.0, "retry_steps_factor", "must be >= 1"),
                (0.0 < self.retry_lr_factor <= 1.0, "retry_lr_factor", "must be in (0, 1]"),
                (self.baseline in BASELINES, "baseline",
                 f"must be one of {', '.join(BASELINES)}")):
            if not ok:
                raise ValueError(f"Gate.{name}={getattr(self, name)!r}: {why}")

    def attempts(self, train_steps: int, learning_rate: float) -> list[tuple[int, float]]:
        """``(train_steps, learning_rate)`` of the first try and of every retry."""
        return [(max(1, round(train_steps * self.retry_steps_factor**a)),
                 learning_rate * self.retry_lr_factor**a) for a in range(self.max_retries + 1)]

    def passes(self, fid: float, baseline_fid: float) -> bool:
        return math.isfinite(fid) and fid <= self.max_fid_ratio * baseline_fid


@dataclass(frozen=True)
class StageRecord:
    """One attempt at one stage; stage 0 is the teacher at its N steps."""

    stage: int
    steps: int
    attempt: int
    fid: float
    kid: float
    latency_ms: float
    passed: bool
    train_steps: int
    learning_rate: float
    baseline_fid: float
    final_loss: float
    checkpoint: str


@dataclass(frozen=True)
class DistillResult:
    """The model of the last passing stage, how to sample it, and every attempt's record.

    ``model`` is what samples (a U-Net, or its consistency wrapper): draw images with
    ``engine.sampling.samplers.generate(result.model, result.schedule, ...)``.
    """

    method: str
    model: nn.Module
    schedule: ScheduleConfig
    state: TrainState
    checkpoint: Path
    final_stage: int
    stages: tuple[StageRecord, ...]

    @property
    def final(self) -> StageRecord:
        return next(r for r in self.stages if r.stage == self.final_stage and r.passed)

    @property
    def rolled_back(self) -> bool:
        return self.final_stage < max(r.stage for r in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "schedule": asdict(self.schedule),
                "checkpoint": str(self.checkpoint), "final_stage": self.final_stage,
                "rolled_back": self.rolled_back, "stages": [asdict(r) for r in self.stages]}

    def table(self) -> str:
        """The stage table as Markdown."""
        rows = ["| stage | steps | attempt | FID | KID | latency ms | gate | train steps | lr |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.stages:
            rows.append(f"| {r.stage} | {r.steps} | {r.attempt} | {r.fid:.4g} | {r.kid:.4g} | "
                        f"{r.latency_ms:.1f} | {'pass' if r.passed else 'FAIL'} | "
                        f"{r.train_steps} | {r.learning_rate:.2g} |")
        return "\n".join(rows)


@dataclass(frozen=True)
class Snapshot:
    """A passing stage: its state, the model that samples, how to sample it, its score."""

    stage: int
    state: TrainState
    model: nn.Module
    schedule: ScheduleConfig
    fid: float
    checkpoint: Path


@dataclass(frozen=True)
class StagePlan:
    """One stage: its student's sampling steps and the first attempt's training budget."""

    stage: int
    steps: int
    train_steps: int
    learning_rate: float


@dataclass(frozen=True)
class Trained:
    """What one attempt produced; ``meta`` goes to ``distill.json`` beside the checkpoint."""

    state: TrainState
    model: nn.Module
    schedule: ScheduleConfig
    losses: list[float]
    meta: Mapping[str, Any] = field(default_factory=dict)


Attempt = Callable[[Snapshot, StagePlan, int, float], Trained]
"""``attempt(previous passing snapshot, plan, train_steps, learning_rate) -> Trained``."""


def _as_metrics(value: Quality) -> tuple[float, float]:
    if isinstance(value, Mapping):
        return float(value["fid"]), float(value.get("kid", math.nan))
    return float(value), math.nan


class Scorer:
    """Quality plus batch-1 sampling latency (cached per schedule: weights do not matter)."""

    def __init__(self, quality: QualityFn, config: Config, measure_latency: bool):
        self.quality, self.config, self.measure = quality, config, measure_latency
        self._latency: dict[str, float] = {}

    def __call__(self, model: nn.Module, schedule: ScheduleConfig) -> tuple[float, float, float]:
        fid, kid = _as_metrics(self.quality(model, schedule))
        return fid, kid, self.latency(model, schedule)

    def latency(self, model: nn.Module, schedule: ScheduleConfig) -> float:
        if not self.measure:
            return math.nan
        key = json.dumps(asdict(schedule), sort_keys=True)
        if key not in self._latency:
            stat = sampling_latency(model, replace(self.config, schedule=schedule),  # type: ignore[arg-type]
                                    batch=1)  # any (x_t, t) -> prediction module samples
            self._latency[key] = stat.median_ms
        return self._latency[key]


def _save(state: TrainState, folder: Path, method: str, schedule: ScheduleConfig,
          meta: Mapping[str, Any]) -> Path:
    save_checkpoint(state, folder)
    info = {"method": method, "schedule": asdict(schedule), **meta}
    (folder / "distill.json").write_text(json.dumps(info, indent=2))
    return folder


def teacher_snapshot(teacher: UNet, config: Config, schedule: ScheduleConfig, score: Scorer,
                     out: Path, method: str, emit: Emit) -> tuple[Snapshot, StageRecord]:
    """Stage 0: score the teacher at its N steps and checkpoint it (the last-resort rollback)."""
    teacher.eval()
    opt = optim.AdamW(learning_rate=config.train.learning_rate)
    opt.init(teacher.trainable_parameters())
    state = TrainState(replace(config, schedule=schedule), teacher,
                       tree_map(lambda p: p, teacher.parameters()), opt)
    folder = _save(state, out / f"stage0-{schedule.steps}steps-teacher", method, schedule, {})
    fid, kid, latency = score(teacher, schedule)
    emit(f"stage 0: teacher at {schedule.steps} steps: FID {fid:.4g}  latency {latency:.1f} ms")
    record = StageRecord(0, schedule.steps, 0, fid, kid, latency, True, 0, 0.0, math.nan,
                         math.nan, str(folder))
    return Snapshot(0, state, teacher, schedule, fid, folder), record


def run_stages(start: Snapshot, plans: Sequence[StagePlan], attempt: Attempt, gate: Gate,
               score: Scorer, out: Path, method: str,
               emit: Emit) -> tuple[Snapshot, list[StageRecord]]:
    """Run ``plans`` in order, each gated with retries; stop at the first stage that fails.

    Returns:
        The last passing snapshot (``start`` if none passed) and every attempt's record.
    """
    passing, records = start, []
    for plan in plans:
        baseline = start.fid if gate.baseline == "teacher" else passing.fid
        for a, (steps, lr) in enumerate(gate.attempts(plan.train_steps, plan.learning_rate)):
            trained = attempt(passing, plan, steps, lr)
            folder = _save(trained.state, out / f"stage{plan.stage}-{plan.steps}steps-a{a}",
                           method, trained.schedule, trained.meta)
            record = _judge(trained, plan, a, baseline, gate, score, folder)
            records.append(record)
            emit(f"stage {plan.stage}: {plan.steps} steps, attempt {a} ({steps} train steps, "
                 f"lr {lr:.2g}): loss {record.final_loss:.4g}  FID {record.fid:.4g} vs gate "
                 f"{gate.max_fid_ratio * baseline:.4g}: {'pass' if record.passed else 'FAIL'}")
            if record.passed:
                passing = Snapshot(plan.stage, trained.state, trained.model, trained.schedule,
                                   record.fid, folder)
                break
        else:
            emit(f"stage {plan.stage} failed its gate {gate.max_retries + 1} times: rolling back "
                 f"to stage {passing.stage} ({passing.schedule.steps} steps) and stopping")
            break
    return passing, records


def _judge(trained: Trained, plan: StagePlan, attempt: int, baseline: float, gate: Gate,
           score: Scorer, folder: Path) -> StageRecord:
    """Score one attempt (a diverged one scores infinity unseen) and apply the gate."""
    run = trained.state.config.train
    loss = float(np.mean(trained.losses[-max(1, len(trained.losses) // 10):]))
    fid, kid, latency = math.inf, math.nan, math.nan
    if math.isfinite(loss):
        fid, kid, latency = score(trained.model, trained.schedule)
    return StageRecord(plan.stage, plan.steps, attempt, fid, kid, latency,
                       gate.passes(fid, baseline), trained.state.step, run.learning_rate,
                       baseline, loss, str(folder))


def result_of(method: str, final: Snapshot, records: list[StageRecord]) -> DistillResult:
    """The :class:`DistillResult` of a run that ended at ``final``."""
    return DistillResult(method, final.model, final.schedule, final.state, final.checkpoint,
                         final.stage, tuple(records))
