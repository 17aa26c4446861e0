"""Optimised timestep schedules: the K sampling times that minimise sampling error.

For a trained model and a budget of K steps, the times are chosen to minimise the
distance between the K-step sample and a many-step reference solution started from
the same noise (in the spirit of Align Your Steps, Sabour et al. 2024, which bounds
the same discretisation error). The optimiser is a seeded (1+1) evolution strategy with
the 1/5th success rule (Rechenberg 1973): gradient-free, time-limited, and it only
accepts improvements, so the result is never worse than the spacing it started from
on the validation batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.sampling.diffusion import Denoise
from engine.sampling.samplers import get_sampler
from engine.sampling.schedules import (
    T_MIN,
    grid_from_times,
    log_snr,
    time_of_sigma_ratio,
    trailing_times,
)


@dataclass(frozen=True)
class ScheduleSearch:
    """Result: the optimised times (descending, excluding 0) and the error trace."""

    times: tuple[float, ...]
    error: float
    baseline_error: float
    evaluations: int
    seconds: float


def times_from_logits(z: np.ndarray, kind: str) -> np.ndarray:
    """K times from K logits: softmax gives the log-SNR increments between t = 1 and T_MIN.

    The first time is always 1 (where the prior is N(0, I)); positions of the other K - 1
    are cumulative sums of the softmax, linear in log-SNR.
    """
    p = np.exp(z - z.max())
    p /= p.sum()
    frac = np.concatenate([[0.0], np.cumsum(p)[:-1]])  # K positions in [0, 1)
    lam_hi, lam_lo = log_snr(np.array([1.0]), kind)[0], log_snr(np.array([T_MIN]), kind)[0]
    lam = lam_hi + frac * (lam_lo - lam_hi)
    t = time_of_sigma_ratio(np.exp(-lam), kind)
    t[0] = 1.0
    return np.maximum(t, T_MIN)


def logits_from_times(ts: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of :func:`times_from_logits` for a schedule starting at t = 1."""
    lam = log_snr(np.maximum(np.asarray(ts, np.float64), T_MIN), kind)
    lam_hi, lam_lo = log_snr(np.array([1.0]), kind)[0], log_snr(np.array([T_MIN]), kind)[0]
    frac = np.append((lam - lam_hi) / (lam_lo - lam_hi), 1.0)
    return np.log(np.maximum(np.diff(frac), 1e-6))


def sampling_error(denoise: Denoise, noise: mx.array, reference: mx.array, ts: np.ndarray,
                   kind: str, sampler: str) -> float:
    """Mean squared distance between the sample on times ``ts`` and the reference samples."""
    out = get_sampler(sampler)(denoise, noise, grid_from_times(ts, kind), mx.random.key(0), 0.0)
    return float(mx.mean((out - reference) ** 2).item())


def reference_samples(denoise: Denoise, noise: mx.array, kind: str, steps: int = 200) -> mx.array:
    """A many-step DPM-Solver++(2M) solution of the probability-flow ODE from ``noise``."""
    out = get_sampler("dpmpp_2m")(denoise, noise, grid_from_times(trailing_times(steps), kind),
                                  mx.random.key(0), 0.0)
    mx.eval(out)
    return out


def optimize_times(error: Callable[[np.ndarray], float], k: int, kind: str,
                   init: np.ndarray | None = None, seed: int = 0, time_limit_s: float = 60.0,
                   max_evals: int = 300) -> ScheduleSearch:
    """Minimise ``error(times)`` over K-step schedules with a (1+1)-ES on the logits.

    Args:
        error: maps descending times (length K, first = 1) to a sampling error.
        k: number of sampling steps.
        kind: beta schedule name.
        init: starting times (default: trailing spacing).
        seed: seed of the perturbations.
        time_limit_s: wall-clock budget.
        max_evals: budget of error evaluations.
    """
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    z = logits_from_times(trailing_times(k) if init is None else init, kind)
    best = baseline = error(times_from_logits(z, kind))
    step, evals = 0.5, 1
    while evals < max_evals and time.perf_counter() - start < time_limit_s and k > 1:
        candidate = z + step * rng.normal(size=z.shape)
        value = error(times_from_logits(candidate, kind))
        evals += 1
        if value < best:
            z, best, step = candidate, value, step * 1.5
        else:
            step *= 1.5 ** (-1 / 4)  # 1/5th success rule
        step = float(np.clip(step, 1e-3, 3.0))
    return ScheduleSearch(tuple(float(t) for t in times_from_logits(z, kind)), best, baseline,
                          evals, time.perf_counter() - start)


def optimize_schedule(denoise: Denoise, shape: tuple[int, ...], k: int, kind: str, sampler: str,
                      batch: int = 64, seed: int = 0, time_limit_s: float = 60.0,
                      max_evals: int = 300, reference_steps: int = 200) -> ScheduleSearch:
    """Optimise K sampling times for a model, against a many-step reference on a noise batch.

    Args:
        denoise: the model as ``denoise(x, t) -> (x0, eps)``.
        shape: one image, (H, W, C).
        k: sampling steps.
        kind: beta schedule.
        sampler: the sampler the times are tuned for.
        batch: validation noise samples.
        seed: seed of the noise and of the optimiser.
    """
    noise = mx.random.normal((batch, *shape), key=mx.random.key(seed))
    reference = reference_samples(denoise, noise, kind, reference_steps)
    return optimize_times(lambda ts: sampling_error(denoise, noise, reference, ts, kind, sampler),
                          k, kind, seed=seed, time_limit_s=time_limit_s, max_evals=max_evals)
