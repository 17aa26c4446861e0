"""Samplers: one signature, chosen by name, random key passed in.

Every sampler is ``sample(denoise, x, grid, key, eta) -> x_0``: it starts from ``x``
(noise at ``grid.t[0]``), calls ``denoise(x_t, t) -> (x0, eps)`` once per step (twice
for none), and returns the sample at ``t = 0``. Deterministic samplers ignore ``key``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import mlx.core as mx
from mlx import nn

from engine.config import ScheduleConfig
from engine.device.blas import blas_threads
from engine.sampling.adaptive import sample_adaptive
from engine.sampling.diffusion import Denoise, cpu_streams, denoiser
from engine.sampling.schedules import Grid, grid

Sampler = Callable[[Denoise, mx.array, Grid, mx.array, float], mx.array]


def sample_ddim(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                eta: float = 0.0) -> mx.array:
    """DDIM (Song et al. 2021, eq. 12); ``eta = 1`` is DDPM's ancestral sampler."""
    keys = mx.random.split(key, max(grid.steps, 2))
    for i in range(grid.steps):
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        x0, eps = denoise(x, float(grid.t[i]))
        c = eta * math.sqrt(max((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2), 0.0))
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * mx.random.normal(x.shape, key=keys[i])
    return x


def sample_ddpm(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                eta: float = 1.0) -> mx.array:
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), i.e. DDIM with ``eta = 1``."""
    return sample_ddim(denoise, x, grid, key, eta=1.0)


def sample_euler(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                 eta: float = 0.0) -> mx.array:
    """Euler on the probability-flow ODE in ``x/alpha`` vs ``sigma/alpha`` (Karras et al. 2022, Alg. 1)."""
    for i in range(grid.steps):
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        _, eps = denoise(x, float(grid.t[i]))
        x_tilde = x / a_t + (s_s / a_s - s_t / a_t) * eps
        x = a_s * x_tilde
    return x


def sample_dpmpp_2m(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                    eta: float = 0.0) -> mx.array:
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Alg. 2)."""
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(grid.alpha, grid.sigma)]
    x0_prev, h_prev = None, None
    for i in range(grid.steps):
        s_t, a_s, s_s = float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        x0, _ = denoise(x, float(grid.t[i]))
        if s_s == 0.0:
            return x0  # the last step to t = 0 is first order: x_0 = D(x_t)
        h = lam[i + 1] - lam[i]
        d = x0
        if x0_prev is not None and h_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name; unknown names raise ``ValueError``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None


def generate(model: nn.Module, schedule: ScheduleConfig, n: int, seed: int, image_size: int,
             channels: int, clip_x0: bool = True, labels: mx.array | None = None) -> mx.array:
    """Draw ``n`` images (n, H, W, C) from ``model`` with the configured sampler and grid.

    A class-conditional ``model`` draws ``labels`` (default: every class equally often,
    :func:`engine.sampling.diffusion.balanced_labels`) under ``schedule.guidance``.

    ``adaptive`` integrates with per-sample step sizes instead of a grid
    (:func:`engine.sampling.adaptive.sample_adaptive`, at most ``schedule.steps`` evaluations).
    """
    k_noise, k_sample = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((n, image_size, image_size, channels), key=k_noise)
    if schedule.sampler == "adaptive":
        result = sample_adaptive(model, x, schedule.prediction, schedule.beta_schedule,
                                 atol=schedule.tolerance, rtol=schedule.tolerance,
                                 max_nfe=schedule.steps)
        return mx.clip(result.samples, -1.0, 1.0) if clip_x0 else result.samples
    denoise = denoiser(model, schedule.prediction, schedule.beta_schedule, clip_x0,
                       schedule.guidance, labels)
    # A batch split over CPU streams gives each stream one BLAS thread (diffusion.cpu_streams).
    with blas_threads(1) if min(cpu_streams(), n) > 1 else nullcontext():
        out = get_sampler(schedule.sampler)(denoise, x, grid(schedule), k_sample, schedule.eta)
        mx.eval(out)
    return out
