"""Noise schedules and sampling-time grids: pure functions of their arguments.

Time is continuous, ``t`` in [0, 1], with ``x_t = alpha(t) x_0 + sigma(t) eps`` and
``alpha^2 + sigma^2 = 1`` (variance preserving). A grid is the list of times a
sampler visits, from high to low, always ending at ``t = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.config import ScheduleConfig

ALPHA_BAR_MIN = 1e-5
T_MIN = 1e-3  # the smallest time a network is trained on or evaluated at
# Defaults of the three schedules; engine.sampling.diffusion.alpha_sigma_mx uses the same constants.
BETA_MIN, BETA_MAX = 0.1, 20.0
COSINE_S = 0.008
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0


def alpha_bar_linear(t: np.ndarray, beta_min: float = BETA_MIN,
                     beta_max: float = BETA_MAX) -> np.ndarray:
    """VP-SDE with linear beta(t), the continuous DDPM schedule (Song et al. 2021, eq. 33)."""
    return np.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2)


def alpha_bar_cosine(t: np.ndarray, s: float = COSINE_S) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def alpha_bar_sigmoid(t: np.ndarray, start: float = SIGMOID_START, end: float = SIGMOID_END,
                      tau: float = SIGMOID_TAU) -> np.ndarray:
    """Sigmoid schedule (Jabri et al. 2022, Alg. 8)."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    return (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)


_ALPHA_BAR = {"linear": alpha_bar_linear, "cosine": alpha_bar_cosine, "sigmoid": alpha_bar_sigmoid}


def alpha_bar(t: np.ndarray | float, kind: str) -> np.ndarray:
    """``alpha(t)^2`` for beta schedule ``kind``, clipped away from 0 at t = 1."""
    t = np.asarray(t, dtype=np.float64)
    return np.clip(_ALPHA_BAR[kind](t), ALPHA_BAR_MIN, 1.0)


def alpha_sigma(t: np.ndarray | float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Signal and noise scales ``(alpha, sigma)`` at time ``t``."""
    ab = alpha_bar(t, kind)
    return np.sqrt(ab), np.sqrt(1.0 - ab)


def log_snr(t: np.ndarray | float, kind: str) -> np.ndarray:
    """Half log-SNR, ``lambda(t) = log(alpha / sigma)`` (Lu et al. 2022, eq. 3.1)."""
    a, s = alpha_sigma(t, kind)
    return np.log(a / s)


def time_of_log_snr(lam: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of :func:`log_snr`, clipped to ``T_MIN``."""
    return np.maximum(time_of_sigma_ratio(np.exp(-np.asarray(lam)), kind), T_MIN)


def time_of_sigma_ratio(ratio: np.ndarray, kind: str, resolution: int = 20001) -> np.ndarray:
    """Invert ``sigma(t)/alpha(t)`` (monotone in t) by interpolation on a dense grid."""
    grid = np.linspace(0.0, 1.0, resolution)
    a, s = alpha_sigma(grid, kind)
    return np.interp(np.log(ratio), np.log(np.maximum(s / a, 1e-12)), grid)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``n`` noise levels from ``sigma_max`` down to ``sigma_min``."""
    ramp = np.linspace(0.0, 1.0, n)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def uniform_times(n: int) -> np.ndarray:
    """DDIM's original "leading" spacing (Song et al. 2021): starts at 1 - 1/n, not 1."""
    return np.arange(n - 1, -1, -1) / n + T_MIN


def trailing_times(n: int) -> np.ndarray:
    """Trailing spacing (Lin et al. 2024, Table 2): starts exactly at t = 1."""
    return np.arange(n, 0, -1) / n


def quadratic_times(n: int) -> np.ndarray:
    """Quadratic spacing (Song et al. 2021, App. D.2): denser near t = 0."""
    return (np.arange(n, 0, -1) / n) ** 2


def karras_times(n: int, kind: str, rho: float = 7.0) -> np.ndarray:
    """Karras spacing mapped back to times through ``sigma/alpha`` of the schedule."""
    a_min, s_min = alpha_sigma(T_MIN, kind)
    a_max, s_max = alpha_sigma(1.0, kind)
    ratios = karras(n, float(s_min / a_min), float(s_max / a_max), rho)
    return np.maximum(time_of_sigma_ratio(ratios, kind), T_MIN)


@dataclass(frozen=True)
class Grid:
    """Sampler times ``t`` (length steps + 1, ending at 0) with ``alpha`` and ``sigma`` there."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def times(cfg: ScheduleConfig) -> np.ndarray:
    """The descending times (excluding the final 0) at which the sampler calls the model."""
    n = cfg.steps
    if cfg.spacing in ("explicit", "optimized"):
        return np.asarray(cfg.timesteps, dtype=np.float64)
    if cfg.spacing == "karras":
        return karras_times(n, cfg.beta_schedule)
    return {"uniform": uniform_times, "trailing": trailing_times,
            "quadratic": quadratic_times}[cfg.spacing](n)


def grid_from_times(ts: np.ndarray, kind: str) -> Grid:
    """A :class:`Grid` visiting ``ts`` (descending, in (0, 1]) and then t = 0."""
    t = np.concatenate([np.asarray(ts, dtype=np.float64), [0.0]])
    alpha, sigma = alpha_sigma(t, kind)
    return Grid(t=t, alpha=alpha, sigma=sigma)


def grid(cfg: ScheduleConfig) -> Grid:
    """The sampling grid for a schedule config."""
    return grid_from_times(times(cfg), cfg.beta_schedule)
