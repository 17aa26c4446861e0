"""Per-sample adaptive step sizes, and a step budget chosen from measured latency.

``sample_adaptive`` integrates the probability-flow ODE with DPM-Solver-12 (Lu et al.
2022, Sec. 3.3): each step computes a first-order (DDIM) and a second-order (midpoint)
solution from shared evaluations, and their difference controls the step size in
log-SNR, separately for every sample. Samples that reach the end drop out of the batch,
so easy samples cost fewer network evaluations than hard ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.config import ScheduleConfig
from engine.sampling.diffusion import to_x0_eps
from engine.sampling.schedules import T_MIN, alpha_sigma, log_snr, time_of_log_snr


@dataclass(frozen=True)
class AdaptiveResult:
    """Samples and the network evaluations each one used."""

    samples: mx.array
    nfe: np.ndarray  # (B,) evaluations per sample

    @property
    def mean_nfe(self) -> float:
        return float(self.nfe.mean())


def _bcast(v: np.ndarray) -> mx.array:
    return mx.array(v.astype(np.float32))[:, None, None, None]


class _Eps:
    """Batched noise prediction at per-sample times, counting evaluations per sample."""

    def __init__(self, model: nn.Module, prediction: str, kind: str, n: int):
        self.model, self.prediction, self.kind = model, prediction, kind
        self.nfe = np.zeros(n, dtype=np.int64)

    def __call__(self, x: mx.array, t: np.ndarray, idx: np.ndarray) -> mx.array:
        a, s = alpha_sigma(t, self.kind)
        out = self.model(x, mx.array(t.astype(np.float32)))
        _, eps = to_x0_eps(out, x, _bcast(a), _bcast(s), self.prediction)
        self.nfe[idx] += 1
        return eps


def sample_adaptive(model: nn.Module, noise: mx.array, prediction: str, kind: str,
                    atol: float = 0.02, rtol: float = 0.02, max_nfe: int = 64,
                    h_init: float = 0.5) -> AdaptiveResult:
    """Adaptive-step DPM-Solver-12 from ``noise`` at t = 1 to t = T_MIN, then denoise.

    Args:
        model: network mapping ``(x_t, t)`` with per-sample ``t`` to its prediction target.
        noise: (B, H, W, C) samples from N(0, I).
        prediction: ``eps``, ``v`` or ``x0``.
        kind: beta schedule.
        atol, rtol: error tolerances per pixel (RMS over the image).
        max_nfe: cap on evaluations per sample; a sample at its cap takes one final step.
        h_init: first step in log-SNR.
    """
    if max_nfe < 3:
        raise ValueError(f"max_nfe={max_nfe}: needs at least 3 (one step and the final denoise)")
    n = noise.shape[0]
    eps_fn = _Eps(model, prediction, kind, n)
    lam_end = float(log_snr(np.array([T_MIN]), kind)[0])
    lam = np.full(n, float(log_snr(np.array([1.0]), kind)[0]))
    h = np.full(n, h_init)
    x = noise
    done = np.zeros(n, dtype=bool)
    out: list[mx.array | None] = [None] * n
    while not done.all():
        idx = np.flatnonzero(~done)
        xa = x[mx.array(idx)] if len(idx) < n else x
        x_new, lam_new, h_new, finished = _step(eps_fn, xa, idx, lam[idx], h[idx], lam_end,
                                                atol, rtol, max_nfe, kind)
        lam[idx], h[idx] = lam_new, h_new
        x = _scatter(x, idx, x_new, n)
        if finished.any():
            x0 = _final_x0(eps_fn, x_new[mx.array(np.flatnonzero(finished))], idx[finished], kind)
            for j, i in enumerate(idx[finished]):
                out[i] = x0[j:j + 1]
        done[idx[finished]] = True
    samples = mx.concatenate([o for o in out if o is not None])
    mx.eval(samples)
    return AdaptiveResult(samples, eps_fn.nfe.copy())


def _scatter(x: mx.array, idx: np.ndarray, values: mx.array, n: int) -> mx.array:
    if len(idx) == n:
        return values
    x = mx.array(x)
    x[mx.array(idx)] = values
    return x


def _final_x0(eps_fn: _Eps, x: mx.array, idx: np.ndarray, kind: str) -> mx.array:
    """Denoise the samples ``idx`` that reached T_MIN, in one batched evaluation."""
    t = np.full(len(idx), T_MIN)
    a, s = (float(v[0]) for v in alpha_sigma(t[:1], kind))
    eps = eps_fn(x, t, idx)
    return mx.clip((x - s * eps) / a, -1e3, 1e3)


def _step(eps_fn: _Eps, x: mx.array, idx: np.ndarray, lam: np.ndarray, h: np.ndarray,
          lam_end: float, atol: float, rtol: float, max_nfe: int,
          kind: str) -> tuple[mx.array, np.ndarray, np.ndarray, np.ndarray]:
    """One attempted step per active sample; returns x, lambda, next h, finished mask."""
    # A step costs 2 evaluations and the final denoise 1: force the last step while it fits.
    at_cap = eps_fn.nfe[idx] + 5 > max_nfe
    h = np.where(at_cap, lam_end - lam, np.minimum(h, lam_end - lam))
    t = time_of_log_snr(lam, kind)
    t_s, t_u = time_of_log_snr(lam + h, kind), time_of_log_snr(lam + h / 2, kind)
    (a_t, s_t), (a_s, s_s), (a_u, s_u) = (alpha_sigma(v, kind) for v in (t, t_s, t_u))
    eps_t = eps_fn(x, t, idx)
    # DDIM (first order) to s, and to the midpoint u (Lu et al. 2022, Alg. 1 with r = 1/2).
    x1 = _bcast(a_s / a_t) * x - _bcast(s_s * np.expm1(h)) * eps_t
    x_u = _bcast(a_u / a_t) * x - _bcast(s_u * np.expm1(h / 2)) * eps_t
    eps_u = eps_fn(x_u, t_u, idx)
    x2 = _bcast(a_s / a_t) * x - _bcast(s_s * np.expm1(h)) * eps_u
    scale = atol + rtol * mx.maximum(mx.abs(x1), mx.abs(x))
    err = np.array(mx.sqrt(mx.mean(((x2 - x1) / scale) ** 2, axis=(1, 2, 3))))
    accept = (err <= 1.0) | at_cap
    lam_new = np.where(accept, lam + h, lam)
    # Standard controller: safety 0.9, growth at most 2x per step, error ~ h^2.
    h_next = np.clip(0.9 * h * np.clip(err, 1e-4, None) ** -0.5, 0.2 * h, 2.0 * h)
    h_next = np.maximum(h_next, 1e-3)
    x_next = mx.where(mx.array(accept)[:, None, None, None], x2, x)
    finished = accept & (np.abs(lam_new - lam_end) < 1e-9)
    return x_next, lam_new, h_next, finished


def nfe_histogram(nfe: np.ndarray) -> dict[int, int]:
    """How many samples used each evaluation count."""
    values, counts = np.unique(nfe, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


@dataclass(frozen=True)
class StepBudget:
    """The sampler and step count chosen for a latency target, with the prediction."""

    sampler: str
    steps: int
    predicted_ms: float
    target_ms: float


# At few steps the second-order multistep solver is the most accurate per evaluation
# (Lu et al. 2022, Table 2); with many steps the samplers converge and DDIM is cheapest.
_PREFERENCE = (("dpmpp_2m", 4, 25), ("ddim", 1, 4000))


def with_budget(schedule: ScheduleConfig, budget: StepBudget) -> ScheduleConfig:
    """``schedule`` sampling with ``budget``'s sampler and steps.

    The adaptive sampler keeps itself, with the steps as its cap on evaluations, when at
    least 3 fit; a spacing of stored times (``explicit``, ``optimized``) becomes trailing.
    """
    if not (schedule.sampler == "adaptive" and budget.steps >= 3):
        schedule = replace(schedule, sampler=budget.sampler)
    if schedule.spacing in ("explicit", "optimized"):
        schedule = replace(schedule, spacing="trailing", timesteps=())
    return replace(schedule, steps=budget.steps)


def choose_budget(target_ms: float, per_eval_ms: float, overhead_ms: float = 0.0,
                  max_steps: int = 1000) -> StepBudget:
    """The most steps (and the best sampler for that count) that fit ``target_ms``.

    Args:
        target_ms: latency target for one sampling call.
        per_eval_ms: measured latency of one network evaluation on this device.
        overhead_ms: measured fixed cost per call (noise, transfers).
        max_steps: cap on steps.

    Raises:
        ValueError: not even one step fits the target.
    """
    steps = min(max_steps, math.floor((target_ms - overhead_ms) / per_eval_ms))
    if steps < 1:
        raise ValueError(f"max latency {target_ms:.1f} ms is below one network evaluation "
                         f"({per_eval_ms:.1f} ms) on this device")
    sampler = next(name for name, lo, hi in _PREFERENCE if lo <= steps <= hi)
    return StepBudget(sampler, steps, overhead_ms + steps * per_eval_ms, target_ms)
