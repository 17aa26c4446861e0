"""Distillation losses, in the papers' symbols: progressive (Salimans & Ho 2022), consistency
(Song et al. 2023), and the eps -> v reparametrisation that precedes both.

Each loss is a plain function of ``(student, <frozen networks>, x0, key, ...)``; a driver
binds the frozen networks (teacher, EMA target) and settings in a closure, giving the
``loss_fn(model, x0, key)`` that :func:`engine.training.train.compiled_update` trains.
Arrays: ``x0``, ``z`` are (B, H, W, C); per-sample ``alpha``, ``sigma`` are (B, 1, 1, 1).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from engine.sampling.diffusion import alpha_sigma_mx, to_x0_eps
from engine.sampling.schedules import T_MIN

__all__ = [
    "EPS",
    "SIGMA_DATA",
    "c_skip_c_out",
    "consistency_function",
    "consistency_loss",
    "ddim_step",
    "progressive_loss",
    "reparam_loss",
    "snr_weight",
]

SIGMA_DATA = 0.5  # Song et al. 2023 / Karras et al. 2022
EPS = T_MIN  # the consistency boundary time: f(x, EPS) = x

Grid3 = tuple[mx.array, mx.array, mx.array]
"""``(t, alpha, sigma)`` of a time grid, each (n,); see ``engine.sampling.substeps.grid_arrays``."""


def _expand(a: mx.array) -> mx.array:
    return a[:, None, None, None]


def snr_weight(alpha: mx.array, sigma: mx.array, weight: str) -> mx.array:
    """x-space loss weight: max(SNR, 1) or SNR + 1 (Salimans & Ho 2022, Sec. 4)."""
    snr = alpha**2 / sigma**2
    return mx.maximum(snr, 1.0) if weight == "truncated_snr" else snr + 1.0


def _teacher_x0_eps(model: nn.Module, prediction: str, z: mx.array, t: mx.array,
                    alpha: mx.array, sigma: mx.array) -> tuple[mx.array, mx.array]:
    """Batched ``denoise``: x0 clipped to [-1, 1] and eps made consistent, as DDIM samples."""
    x0, _ = to_x0_eps(model(z, t), z, alpha, sigma, prediction)
    x0 = mx.clip(x0, -1.0, 1.0)
    return x0, (z - alpha * x0) / sigma


def ddim_step(model: nn.Module, prediction: str, z: mx.array, t: mx.array, a: mx.array,
              s: mx.array, a_next: mx.array, s_next: mx.array) -> mx.array:
    """One deterministic DDIM step from t to the next time (Song et al. 2021, eq. 12)."""
    x0, eps = _teacher_x0_eps(model, prediction, z, t, a, s)
    return a_next * x0 + s_next * eps


def progressive_loss(student: nn.Module, teacher: nn.Module, x0: mx.array, key: mx.array,
                     grid: Grid3, student_prediction: str, teacher_prediction: str,
                     weight: str) -> mx.array:
    """Salimans & Ho 2022, Alg. 2: one student DDIM step matches two teacher DDIM steps.

    Args:
        x0: data batch (B, H, W, C).
        grid: the teacher's ``(t, alpha, sigma)``, each (2K + 1,), descending to t = 0;
            the student steps from ``t[2i]`` to ``t[2i + 2]``, the teacher via ``t[2i + 1]``.
    """
    gt, ga, gs = grid
    k_i, k_eps = mx.random.split(key)
    i = 2 * mx.random.randint(0, (gt.shape[0] - 1) // 2, (x0.shape[0],), key=k_i)
    t, t1 = gt[i], gt[i + 1]
    (a, a1, a2), (s, s1, s2) = ([_expand(g[j]) for j in (i, i + 1, i + 2)] for g in (ga, gs))
    z = a * x0 + s * mx.random.normal(x0.shape, key=k_eps)
    z1 = ddim_step(teacher, teacher_prediction, z, t, a, s, a1, s1)
    z2 = ddim_step(teacher, teacher_prediction, z1, t1, a1, s1, a2, s2)
    x_target = mx.stop_gradient((z2 - (s2 / s) * z) / (a2 - (s2 / s) * a))
    x_hat, _ = to_x0_eps(student(z, t), z, a, s, student_prediction)
    per_image = mx.mean((x_target - x_hat) ** 2, axis=(1, 2, 3))
    return mx.mean(snr_weight(a, s, weight).reshape(-1) * per_image)


def reparam_loss(student: nn.Module, teacher: nn.Module, x0: mx.array, key: mx.array,
                 student_prediction: str, teacher_prediction: str, kind: str,
                 weight: str) -> mx.array:
    """Regress the student's x0 on the teacher's (clipped) x0 at uniform times."""
    k_t, k_eps = mx.random.split(key)
    t = mx.random.uniform(T_MIN, 1.0, (x0.shape[0],), key=k_t)
    a, s = (_expand(v) for v in alpha_sigma_mx(t, kind))
    z = a * x0 + s * mx.random.normal(x0.shape, key=k_eps)
    x_target = mx.stop_gradient(_teacher_x0_eps(teacher, teacher_prediction, z, t, a, s)[0])
    x_hat, _ = to_x0_eps(student(z, t), z, a, s, student_prediction)
    per_image = mx.mean((x_target - x_hat) ** 2, axis=(1, 2, 3))
    return mx.mean(snr_weight(a, s, weight).reshape(-1) * per_image)


def _sigma_ve(t: mx.array, kind: str) -> mx.array:
    """Noise level ``sigma_t / alpha_t`` of the variance-exploding variable ``x_t / alpha_t``."""
    alpha, sigma = alpha_sigma_mx(t, kind)
    return sigma / alpha


def c_skip_c_out(t: mx.array, kind: str, sigma_data: float = SIGMA_DATA,
                 eps: float = EPS) -> tuple[mx.array, mx.array]:
    """Song et al. 2023, App. C: EDM's c_skip, c_out at ``s = sigma(t) - sigma(eps)``, shape (B,).

    ``s`` is exactly 0 at ``t = eps`` (the same ops on the same input), so ``c_skip = 1``
    and ``c_out = 0`` there exactly. ``c_out`` lacks EDM's ``sigma_data`` factor because it
    scales a data-space ``x0`` rather than a unit-variance network output.
    """
    s = mx.maximum(_sigma_ve(t, kind) - _sigma_ve(mx.full(t.shape, eps, t.dtype), kind), 0.0)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / mx.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out


def consistency_function(model: nn.Module, x: mx.array, t: mx.array, prediction: str, kind: str,
                         sigma_data: float = SIGMA_DATA, eps: float = EPS) -> mx.array:
    """``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)`` for x (B, H, W, C), t (B,)."""
    alpha, sigma = (_expand(a) for a in alpha_sigma_mx(t, kind))
    x0, _ = to_x0_eps(model(x, t), x, alpha, sigma, prediction)
    c_skip, c_out = (_expand(c) for c in c_skip_c_out(t, kind, sigma_data, eps))
    return c_skip * x + c_out * x0


def consistency_loss(model: nn.Module, target: nn.Module, teacher: nn.Module, x0: mx.array,
                     key: mx.array, grid: Grid3, prediction: str, teacher_prediction: str,
                     kind: str, sigma_data: float = SIGMA_DATA, eps: float = EPS) -> mx.array:
    """Song et al. 2023, Alg. 2 (CD), with d = squared L2, lambda = 1 and a DDIM teacher step.

    Args:
        x0: data batch (B, H, W, C).
        grid: ``(t, alpha, sigma)`` of the discretisation, each (N,), ascending from ``eps``.
    """
    gt, ga, gs = grid
    k_n, k_z = mx.random.split(key)
    n = mx.random.randint(0, gt.shape[0] - 1, (x0.shape[0],), key=k_n)
    t, t_next = gt[n], gt[n + 1]
    (a, a_next), (s, s_next) = ([_expand(g[j]) for j in (n, n + 1)] for g in (ga, gs))
    z = a_next * x0 + s_next * mx.random.normal(x0.shape, key=k_z)
    x_hat = mx.stop_gradient(ddim_step(teacher, teacher_prediction, z, t_next, a_next, s_next,
                                       a, s))
    f_target = mx.stop_gradient(consistency_function(target, x_hat, t, prediction, kind,
                                                     sigma_data, eps))
    f_online = consistency_function(model, z, t_next, prediction, kind, sigma_data, eps)
    return mx.mean((f_online - f_target) ** 2)
