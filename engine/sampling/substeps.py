"""Schedules at fewer steps: a teacher's DDIM schedule, its sub-schedules, grids as arrays.

Distillation halves (progressive) or replaces (consistency) a teacher's sampling grid;
these pure functions name those grids as :class:`engine.config.ScheduleConfig` values
that ``engine.sampling.samplers.generate`` samples, and as arrays that batched losses index.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from engine.config import Config, ScheduleConfig
from engine.sampling.schedules import alpha_sigma, times

__all__ = ["base_schedule", "grid_arrays", "schedule_grid", "sub_schedule"]


def base_schedule(config: Config, steps: int, spacing: str = "trailing") -> ScheduleConfig:
    """The teacher's deterministic DDIM sampler at ``steps`` on ``spacing``."""
    return replace(config.schedule, sampler="ddim", steps=steps, eta=0.0, spacing=spacing,
                   timesteps=())


def sub_schedule(base: ScheduleConfig, steps: int, prediction: str) -> ScheduleConfig:
    """Every ``base.steps // steps``-th time of ``base``, named by its spacing if it matches."""
    every = base.steps // steps
    ts = np.concatenate([times(base), [0.0]])[::every][:-1]
    named = replace(base, steps=steps, prediction=prediction)
    if np.allclose(times(named), ts, rtol=0, atol=1e-9):
        return named
    return replace(named, spacing="explicit", timesteps=tuple(float(t) for t in ts))


def grid_arrays(ts: np.ndarray, kind: str) -> tuple[mx.array, mx.array, mx.array]:
    """``(t, alpha, sigma)`` at times ``ts``, computed in float64 so that sigma(0) is exactly 0."""
    alpha, sigma = alpha_sigma(np.asarray(ts, dtype=np.float64), kind)
    return tuple(mx.array(np.asarray(v, dtype=np.float32)) for v in (ts, alpha, sigma))  # type: ignore


def schedule_grid(schedule: ScheduleConfig) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`grid_arrays` of a schedule's sampling grid, ending at t = 0."""
    return grid_arrays(np.concatenate([times(schedule), [0.0]]), schedule.beta_schedule)
