"""Diffusion parametrisations and the training loss, in the papers' symbols.

``x_t = alpha_t x_0 + sigma_t eps``. The network predicts one of ``eps`` (Ho et al.
2020), ``x0``, or ``v = alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022, eq. 9).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.sampling.schedules import (
    ALPHA_BAR_MIN,
    BETA_MAX,
    BETA_MIN,
    COSINE_S,
    SIGMOID_END,
    SIGMOID_START,
    SIGMOID_TAU,
    T_MIN,
    alpha_sigma,
)

Denoise = Callable[[mx.array, float], tuple[mx.array, mx.array]]
"""``denoise(x_t, t) -> (x0_hat, eps_hat)``, the interface every sampler drives."""


def alpha_sigma_mx(t: mx.array, kind: str) -> tuple[mx.array, mx.array]:
    """``(alpha_t, sigma_t)`` for a batch of times, in MLX (mirrors engine.sampling.schedules)."""
    if kind == "linear":
        ab = mx.exp(-BETA_MIN * t - 0.5 * (BETA_MAX - BETA_MIN) * t**2)
    elif kind == "cosine":
        s = COSINE_S
        ab = mx.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    else:
        start, end, tau = SIGMOID_START, SIGMOID_END, SIGMOID_TAU
        # Python floats: a numpy scalar on the left would turn the MLX array into numpy.
        v_start, v_end = (float(1 / (1 + np.exp(-v / tau))) for v in (start, end))
        ab = (v_end - mx.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    ab = mx.clip(ab, ALPHA_BAR_MIN, 1.0)
    return mx.sqrt(ab), mx.sqrt(1.0 - ab)


def to_x0_eps(out: mx.array, x: mx.array, alpha: mx.array | float, sigma: mx.array | float,
              prediction: str) -> tuple[mx.array, mx.array]:
    """Convert a network output to ``(x0, eps)`` for any prediction target."""
    if prediction == "eps":
        return (x - sigma * out) / alpha, out
    if prediction == "x0":
        return out, (x - alpha * out) / sigma
    return alpha * x - sigma * out, sigma * x + alpha * out


def target(x0: mx.array, eps: mx.array, alpha: mx.array, sigma: mx.array,
           prediction: str) -> mx.array:
    """The regression target of the network for a prediction type."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - sigma * x0


def _expand(a: mx.array) -> mx.array:
    return a[:, None, None, None]


MIN_SNR_GAMMA = 5.0
"""Min-SNR-gamma loss weighting (Hang et al. 2023): each time step's loss is weighted as an
x0 loss by ``min(SNR, gamma)``, so that the many easy low-noise steps stop dominating the
gradient; the paper's gamma."""


def diffusion_loss(model: nn.Module, x0: mx.array, key: mx.array, prediction: str,
                   kind: str, weighting: str = "none") -> mx.array:
    """Denoising score-matching loss, ``E_t,eps w(t) || f(x_t, t) - target ||^2`` (Ho et al. 2020).

    Args:
        model: maps ``(x_t, t)`` to the prediction target.
        x0: clean images, shape (B, H, W, C), in [-1, 1].
        key: PRNG key for ``t`` and ``eps``.
        prediction: ``eps``, ``v`` or ``x0``.
        kind: beta schedule name.
        weighting: ``none`` (w = 1) or ``min_snr``: ``w = min(SNR, gamma) / SNR`` for eps,
            ``/ (SNR + 1)`` for v, ``min(SNR, gamma)`` for x0 (:data:`MIN_SNR_GAMMA`).
    """
    k_t, k_eps = mx.random.split(key)
    t = mx.random.uniform(T_MIN, 1.0, shape=(x0.shape[0],), key=k_t)
    eps = mx.random.normal(x0.shape, key=k_eps)
    alpha, sigma = (_expand(a) for a in alpha_sigma_mx(t, kind))
    x_t = alpha * x0 + sigma * eps
    out = model(x_t, t)
    err = (out - target(x0, eps, alpha, sigma, prediction)) ** 2
    if weighting == "none":
        return mx.mean(err)
    snr = alpha**2 / sigma**2
    w = mx.minimum(snr, MIN_SNR_GAMMA)
    w = w / snr if prediction == "eps" else w / (snr + 1.0) if prediction == "v" else w
    return mx.mean(w * err)


def compiled_forward(model: nn.Module) -> Callable[[mx.array, mx.array], mx.array]:
    """``model(x, t)`` compiled once per model: fused element-wise ops, fewer graph nodes.

    The weights (and the random state, for dropout) are compile inputs, read at every
    call: a model trained or updated between calls is seen as it is. One trace per
    input shape; the compiled function is kept on the model.
    """
    forward = model.__dict__.get("_compiled_forward")
    if forward is None:
        state = [model.state, mx.random.state]
        forward = mx.compile(model.__call__, inputs=state, outputs=[mx.random.state])
        object.__setattr__(model, "_compiled_forward", forward)  # not a parameter
    return forward


def denoiser(model: nn.Module, prediction: str, kind: str, clip_x0: bool = True) -> Denoise:
    """Wrap a network as ``denoise(x_t, t) -> (x0, eps)``; optionally clip x0 to [-1, 1]."""
    forward = compiled_forward(model)

    def denoise(x: mx.array, t: float) -> tuple[mx.array, mx.array]:
        a, s = (float(v) for v in alpha_sigma(t, kind))
        out = forward(x, mx.full((x.shape[0],), t, dtype=mx.float32))
        x0, eps = to_x0_eps(out, x, a, s, prediction)
        if clip_x0:
            x0 = mx.clip(x0, -1.0, 1.0)
            eps = (x - a * x0) / s
        return x0, eps

    return denoise
