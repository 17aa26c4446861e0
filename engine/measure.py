"""The measurement protocol: how every number reported about a model is taken.

- Latency: the whole sampling loop at batch 1, warmed up, the median of at least 5
  samples (each at least 25 ms of back-to-back runs), each timed between two probes of a
  fixed reference workload; a sample a probe says was disturbed by another process is set
  aside, and clean samples are pooled, in rounds, until the median's 95% confidence
  interval is within +-5%; a latency that never got enough clean samples is marked
  ``disturbed`` (:func:`engine.device.steady.steady_call`).
- Memory: the peak while sampling at batch 1, and while training at the config's batch size.
- Quality: FID, KID, precision and recall of ``n`` samples drawn from ``seed``, on the
  feature network's features, next to the real-vs-real floors at the same ``n``; the first
  samples make the grid.
- A latency target is met by fitting the step count to the measured cost of one network
  evaluation and of the sampler around it (:func:`fit_step_budget`).

A trial (``workers/trial.py``), ``diffnas train`` (:mod:`engine.experiment`), a derived
point (``search/derived/points.py``) and compression's quality gate all measure through here, so
their numbers compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.config import Config, ScheduleConfig
from engine.device.bench import (
    LatencyStat,
    forward_latency,
    sampling_latency,
    sampling_peak_mb,
    training_peak_mb,
)
from engine.device.steady import MAX_ROUNDS, steady_call
from engine.model.unet import UNet
from engine.quality.metrics import FeatureExtractor, QualityRecord, evaluate_quality
from engine.sampling.adaptive import StepBudget, choose_budget, with_budget
from engine.sampling.diffusion import num_classes_of
from engine.sampling.samplers import generate

__all__ = [
    "REFITS",
    "SAMPLE_BATCH",
    "BudgetFit",
    "BudgetRound",
    "Cost",
    "LatencyStat",
    "LatencyTargetInfeasible",
    "Measured",
    "MemoryResult",
    "QualityResult",
    "evaluate",
    "fit_step_budget",
    "measure",
    "measure_cost",
    "measure_latency",
    "measure_memory",
    "sample_images",
    "sampling_memory",
    "side_by_side",
]

SAMPLE_BATCH = 250
"""Images per sampling call when sampling for evaluation; the batch split decides the noise
(batch ``i`` is drawn from ``seed + i``), so changing it changes every FID."""

REFITS = 2
"""Re-choices of the step count when the chosen schedule measured over the target."""


def sample_images(model: nn.Module, config: Config, n: int, seed: int,
                  batch: int = SAMPLE_BATCH) -> np.ndarray:
    """``n`` samples ``(n, H, W, C)`` as numpy, drawn ``batch`` at a time to bound memory.

    The batch starting at image ``i`` is drawn from seed ``seed + i``. A class-conditional
    model draws image ``j`` of class ``j mod num_classes`` (:func:`sample_labels`).
    """
    u = config.unet
    return draw(model, config.schedule, n, seed, u.image_size, u.channels, batch)


def draw(model: nn.Module, schedule: ScheduleConfig, n: int, seed: int, size: int,
         channels: int, batch: int = SAMPLE_BATCH) -> np.ndarray:
    """:func:`sample_images` for a bare schedule (a distillation gate scores students by it)."""
    classes = num_classes_of(model)
    drawn = mx.array(sample_labels(n, classes)) if classes else None
    chunks = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        y = drawn[i:i + b] if drawn is not None else None
        chunks.append(np.array(generate(model, schedule, b, seed + i, size, channels, labels=y)))
    return np.concatenate(chunks)


def sample_labels(n: int, num_classes: int) -> np.ndarray:
    """The classes :func:`sample_images` draws for ``n`` images: ``j mod num_classes``."""
    return np.arange(n, dtype=np.int32) % max(num_classes, 1)


# -- latency and memory ------------------------------------------------------------------


def measure_latency(model: nn.Module, config: Config, runs: int = 5, pin: bool = True,
                    pause: Callable[[float], None] = time.sleep,
                    max_rounds: int = MAX_ROUNDS) -> LatencyStat:
    """Latency of the whole sampling loop at batch 1, steady against other processes.

    Args:
        model: the network to sample.
        config: its config; the schedule sets the sampler and steps.
        runs: samples per round (at least 5).
        pin: keep the process on one core while timing (``benchmarks/steady_latency.py``
            compares without).
        pause: how to wait after a disturbed round (:func:`engine.device.steady.steady_call`).
        max_rounds: the most rounds taken (:data:`engine.device.steady.MAX_ROUNDS`).

    Returns:
        The median of the pooled clean samples (at least ``runs``), with the rounds, the
        disturbed rounds, the reference ratio and the median's confidence interval.
    """
    u = config.unet
    return steady_call(lambda: generate(model, config.schedule, 1, 0, u.image_size, u.channels),
                       runs, pause=pause, pin=pin, max_rounds=max_rounds)


@dataclass(frozen=True)
class MemoryResult:
    """Peak memory (MB): training at the config's batch size, sampling at batch 1."""

    train_mb: float
    sample_mb: float

    def objective(self, which: str) -> float:
        """The memory objective: ``sample``, ``train`` or ``max`` of the two."""
        return {"sample": self.sample_mb, "train": self.train_mb,
                "max": max(self.sample_mb, self.train_mb)}[which]


def sampling_memory(model: nn.Module, config: Config) -> float:
    """Peak memory (MB) of sampling one image, weights included."""
    return sampling_peak_mb(model, config, 1)


def measure_memory(model: nn.Module, config: Config) -> MemoryResult:
    """Peak memory of sampling one image, then of training steps at the config's batch size."""
    sample_mb = sampling_memory(model, config)
    return MemoryResult(training_peak_mb(config), sample_mb)


@dataclass(frozen=True)
class Cost:
    """What running a model costs on this device, and the seconds it took to measure."""

    latency: LatencyStat
    memory: MemoryResult
    seconds: float


def measure_cost(model: nn.Module, config: Config, runs: int = 5,
                 latency: LatencyStat | None = None) -> Cost:
    """Batch-1 sampling latency, then peak memory of sampling and of training.

    Args:
        latency: the latency already measured for this schedule (by :func:`fit_step_budget`);
            it is not measured again.
    """
    start = time.perf_counter()
    stat = latency if latency is not None else measure_latency(model, config, runs)
    memory = measure_memory(model, config)
    return Cost(stat, memory, time.perf_counter() - start)


def side_by_side(model: nn.Module, config: Config, other: nn.Module, other_config: Config,
                 runs: int, rounds: int = 3,
                 max_rounds: int = MAX_ROUNDS) -> tuple[float, float]:
    """Batch-1 sampling latency of two models, alternated ``rounds`` times; the best median
    of each (ms), so that a speed ratio is never taken across a change of machine load.
    Each measurement takes at most ``max_rounds`` rounds of the steady protocol (a study's
    ``[evaluate] latency_rounds``, as its trials do)."""
    best = [np.inf, np.inf]
    for _ in range(rounds):
        for i, (m, c) in enumerate(((model, config), (other, other_config))):
            best[i] = min(best[i], measure_latency(m, c, runs, max_rounds=max_rounds).median_ms)
    return float(best[0]), float(best[1])


# -- quality -----------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityResult:
    """FID/KID/precision/recall with their floors, and the first samples for the grid."""

    record: QualityRecord
    grid: np.ndarray  # (grid, H, W, C) in [-1, 1]

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (what metrics.json and the study store)."""
        return asdict(self.record)


def evaluate(model: nn.Module, config: Config, real: np.ndarray, feature_net: FeatureExtractor,
             n: int, seed: int = 0, grid: int = 0) -> QualityResult:
    """Score ``n`` samples of ``model`` (drawn from ``seed``) against ``real``.

    Args:
        model: the network to sample (a trained state's EMA model).
        config: its config; the schedule sets the sampler and steps.
        real: at least ``2 n`` real images ``(N, H, W, C)`` in [-1, 1].
        feature_net: the embedding (:func:`engine.quality.features.feature_network_for`).
        n: the sample count of every metric and of the real-vs-real floor.
        seed: seed of the samples and of the metrics' subset draws.
        grid: how many of the samples to keep for a sample grid.

    Returns:
        The :class:`QualityResult`.

    Raises:
        ValueError: too few real images, or samples holding NaN or infinity (a diverged model).
    """
    fake = sample_images(model, config, n, seed)
    record = evaluate_quality(fake, real, feature_net, n, seed)
    return QualityResult(record, fake[:grid])


@dataclass(frozen=True)
class Measured:
    """A model measured by the whole protocol."""

    quality: QualityResult
    cost: Cost


def measure(model: nn.Module, config: Config, real: np.ndarray, feature_net: FeatureExtractor,
            n: int, seed: int = 0, grid: int = 0, runs: int = 5) -> Measured:
    """Quality (:func:`evaluate`), then latency and memory (:func:`measure_cost`) of ``model``."""
    quality = evaluate(model, config, real, feature_net, n, seed, grid)
    return Measured(quality, measure_cost(model, config, runs))


# -- step budget -------------------------------------------------------------------------


class LatencyTargetInfeasible(ValueError):
    """Not even one network evaluation fits the latency target on this device.

    ``floor_ms`` is the fastest a sampling call could be here: the sampler's overhead plus
    one network evaluation.
    """

    def __init__(self, message: str, floor_ms: float) -> None:
        super().__init__(message)
        self.floor_ms = floor_ms


@dataclass(frozen=True)
class BudgetRound:
    """One choice of the step count and the latency it measured."""

    sampler: str
    steps: int
    per_step_ms: float
    predicted_ms: float
    measured_ms: float


@dataclass(frozen=True)
class BudgetFit:
    """The config sampling with the most steps that fit a latency target, and why."""

    config: Config
    latency: LatencyStat  # of the chosen schedule
    target_ms: float
    per_eval_ms: float
    overhead_ms: float
    rounds: tuple[BudgetRound, ...]
    seconds: float

    @property
    def reason(self) -> str:
        last = self.rounds[-1]
        return (f"{last.steps} steps of {last.sampler} fit {self.target_ms:g} ms: "
                f"{self.overhead_ms:.3g} ms overhead + {last.steps} x {last.per_step_ms:.3g} ms "
                f"per evaluation = {last.predicted_ms:.4g} ms predicted, {last.measured_ms:.4g} "
                f"ms measured")

    def to_dict(self) -> dict[str, Any]:
        """The record a trial reports as its step budget (JSON-ready)."""
        last = self.rounds[-1]
        return {"target_ms": self.target_ms, "per_eval_ms": self.per_eval_ms,
                "overhead_ms": self.overhead_ms, "sampler": last.sampler, "steps": last.steps,
                "predicted_ms": last.predicted_ms, "measured_ms": last.measured_ms,
                "rounds": [asdict(r) for r in self.rounds],
                "schedule": asdict(self.config.schedule), "reason": self.reason,
                "seconds": self.seconds}


def fit_step_budget(model: UNet, config: Config, target_ms: float, runs: int = 5) -> BudgetFit:
    """``config`` with the most sampling steps that fit ``target_ms`` on this device.

    Measures one network evaluation and the sampler's overhead (a one-step call less one
    evaluation), lets :func:`engine.sampling.adaptive.choose_budget` pick the sampler and
    steps, then measures the chosen schedule; if that comes out over the target, the step
    count is chosen again from the measured cost per step (at most :data:`REFITS` times).

    Raises:
        LatencyTargetInfeasible: not even one network evaluation fits the target here.
    """
    start = time.perf_counter()
    per_eval = forward_latency(model, config).median_ms
    one_step = replace(config, schedule=with_budget(config.schedule,
                                                    StepBudget("ddim", 1, 0.0, target_ms)))
    overhead = max(0.0, sampling_latency(model, one_step, runs=runs).median_ms - per_eval)
    rounds: list[BudgetRound] = []
    cost = per_eval
    for _ in range(REFITS + 1):
        chosen, stat, budget = _try_budget(model, config, target_ms, cost, overhead, runs)
        rounds.append(BudgetRound(chosen.schedule.sampler, budget.steps, cost,
                                  budget.predicted_ms, stat.median_ms))
        if stat.median_ms <= target_ms or budget.steps == 1:
            break
        cost = (stat.median_ms - overhead) / budget.steps
    return BudgetFit(chosen, stat, target_ms, per_eval, overhead, tuple(rounds),
                     time.perf_counter() - start)


def _try_budget(model: UNet, config: Config, target_ms: float, per_step_ms: float,
                overhead_ms: float, runs: int) -> tuple[Config, LatencyStat, StepBudget]:
    """The schedule with the most steps predicted to fit, and its measured latency."""
    try:
        budget = choose_budget(target_ms, per_step_ms, overhead_ms)
    except ValueError as err:
        raise LatencyTargetInfeasible(str(err), overhead_ms + per_step_ms) from None
    chosen = replace(config, schedule=with_budget(config.schedule, budget))
    return chosen, measure_latency(model, chosen, runs), budget
