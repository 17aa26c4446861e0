"""A trial's device measurements: latency of the sampling loop at batch 1, the peak memory
of sampling and training, and a disturbed latency taken again at the end of the trial.

Split from :mod:`workers.trial`, which calls these between its stages.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from engine.config import Config
from engine.device.steady import MAX_ROUNDS
from engine.measure import BudgetFit, LatencyStat, measure_latency, measure_memory
from engine.model.unet import UNet
from workers.clock import PhaseClock
from workers.records import Measurement, latency_attempt


def latency(model: UNet, config: Config, runs: int, fit: BudgetFit | None,
            rounds: int = MAX_ROUNDS) -> tuple[LatencyStat, float]:
    """Latency of the full sampling loop at batch 1 and the seconds it took to measure (the
    step budget's, whose latency is not measured again)."""
    if fit is not None:
        return fit.latency, fit.seconds
    start = time.perf_counter()
    stat = measure_latency(model, config, runs, max_rounds=rounds)
    return stat, time.perf_counter() - start


def measure(model: UNet, config: Config, latency: tuple[LatencyStat, float],
             fit: BudgetFit | None, start: dict[str, Any], clock: PhaseClock) -> Measurement:
    """The measured latency with the peak memory of sampling and training, taken now.

    A peak is this process's own allocation, which other processes' work does not move, so
    memory is measured with the device shared (timed as ``latency``), not to itself.
    """
    stat, latency_s = latency
    with clock.shared("latency"):
        began = time.perf_counter()
        memory = measure_memory(model, config)
        seconds = latency_s + time.perf_counter() - began
    return Measurement(stat.median_ms, stat.spread, stat.samples_ms, memory.train_mb,
                       memory.sample_mb, seconds, fit.to_dict() if fit is not None else None,
                       start, **trust(stat))


def trust(stat: LatencyStat) -> dict[str, Any]:
    """The :class:`Measurement` fields that say how far its latency can be trusted."""
    return {"latency_ci": stat.ci, "latency_rounds": stat.rounds,
            "disturbed_rounds": stat.disturbed_rounds, "reference_ratio": stat.reference_ratio,
            "disturbed": stat.disturbed, "wait_share": stat.wait_share,
            "reference_shift": stat.reference_shift, "host_slowdown": stat.host_slowdown}


def remeasure(model: UNet, config: Config, runs: int, first: Measurement,
              rounds: int = MAX_ROUNDS) -> Measurement:
    """A disturbed latency taken again at the end of the trial, minutes after the first.

    Returns:
        ``first`` with both attempts in ``latency_attempts`` and the latency of the one
        kept: the second if it was clean, else the less disturbed of the two (the one whose
        reference ratio is nearer 1), still marked ``disturbed``.
    """
    start = time.perf_counter()
    stat = measure_latency(model, config, runs, max_rounds=rounds)
    second = replace(first, latency_ms=stat.median_ms, latency_spread=stat.spread,
                     latency_samples_ms=stat.samples_ms, **trust(stat))
    seconds = time.perf_counter() - start
    kept = second if not second.disturbed or (
        abs(second.reference_ratio - 1) <= abs(first.reference_ratio - 1)) else first
    attempts = (latency_attempt(first, "before training", first.seconds),
                latency_attempt(second, "after evaluation", seconds))
    return replace(kept, latency_attempts=attempts)
