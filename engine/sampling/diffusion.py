"""Diffusion parametrisations and the training loss, in the papers' symbols.

``x_t = alpha_t x_0 + sigma_t eps``. The network predicts one of ``eps`` (Ho et al.
2020), ``x0``, or ``v = alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022, eq. 9).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.device import compile_mode
from engine.device.peers import thread_budget
from engine.model.formulation import forward_only
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
                   kind: str, weighting: str = "none", labels: mx.array | None = None,
                   label_dropout: float = 0.0, rows: tuple[int, int] | None = None) -> mx.array:
    """Denoising score-matching loss, ``E_t,eps w(t) || f(x_t, t) - target ||^2`` (Ho et al. 2020).

    Args:
        model: maps ``(x_t, t)`` to the prediction target.
        x0: clean images, shape (B, H, W, C), in [-1, 1].
        key: PRNG key for ``t`` and ``eps``.
        prediction: ``eps``, ``v`` or ``x0``.
        kind: beta schedule name.
        weighting: ``none`` (w = 1) or ``min_snr``: ``w = min(SNR, gamma) / SNR`` for eps,
            ``/ (SNR + 1)`` for v, ``min(SNR, gamma)`` for x0 (:data:`MIN_SNR_GAMMA`).
        labels: class labels (B,) of a class-conditional ``model``; None calls it without.
        label_dropout: the share of ``labels`` replaced by the null label, drawn from ``key``
            (classifier-free guidance's joint training, Ho & Salimans 2022).
        rows: ``(lo, hi)``: the share of rows ``lo:hi`` in the batch's loss, which is what
            one process of a data-parallel step computes (:mod:`engine.training.parallel`).
            ``t``, ``eps`` and the dropped labels are drawn for the whole batch and cut, and
            the mean is scaled by ``(hi - lo) / B``, so the shares sum to the whole loss.
    """
    k_t, k_eps = mx.random.split(key)
    t = mx.random.uniform(T_MIN, 1.0, shape=(x0.shape[0],), key=k_t)
    eps = mx.random.normal(x0.shape, key=k_eps)
    if labels is not None:
        # Unpacked, not [1]: MLX indexes with an integer through a gather, a kernel that its
        # CUDA backend compiles at run time (tests/engine/model/test_cuda_kernels.py).
        _, k_drop = mx.random.split(k_t)
        labels = drop_labels(labels, k_drop, label_dropout, model.config.num_classes)
    share = 1.0
    if rows is not None:
        lo, hi = rows
        share = (hi - lo) / x0.shape[0]
        x0, t, eps = x0[lo:hi], t[lo:hi], eps[lo:hi]
        labels = None if labels is None else labels[lo:hi]
    alpha, sigma = (_expand(a) for a in alpha_sigma_mx(t, kind))
    x_t = alpha * x0 + sigma * eps
    out = model(x_t, t) if labels is None else model(x_t, t, labels)
    err = (out - target(x0, eps, alpha, sigma, prediction)) ** 2
    if weighting != "none":
        snr = alpha**2 / sigma**2
        w = mx.minimum(snr, MIN_SNR_GAMMA)
        err = (w / snr if prediction == "eps" else w / (snr + 1.0) if prediction == "v"
               else w) * err
    return mx.mean(err) if rows is None else mx.mean(err) * share


def drop_labels(labels: mx.array, key: mx.array, rate: float, null: int) -> mx.array:
    """``labels`` with a ``rate`` share, drawn from ``key``, replaced by the ``null`` label."""
    if rate <= 0:
        return labels
    return mx.where(mx.random.uniform(shape=labels.shape, key=key) < rate, null, labels)


def num_classes_of(model: nn.Module) -> int:
    """The classes ``model`` is conditioned on (its config's ``num_classes``; 0 if none)."""
    return int(getattr(getattr(model, "config", None), "num_classes", 0))


def cpu_streams() -> int:
    """How many CPU streams a sampling batch is split over (1: no split).

    MLX's CPU backend runs element-wise ops, reductions and copies on one thread; only
    BLAS uses more. It runs each stream on its own thread, so halves of a batch evaluated
    on two streams use two cores throughout. The count follows the thread budget the
    process was given: ``DIFFNAS_CPU_STREAMS`` if set, else
    :func:`engine.device.peers.thread_budget`, and 1 off the CPU.
    """
    if mx.default_device() != mx.cpu:
        return 1
    value = os.environ.get("DIFFNAS_CPU_STREAMS")
    if not value:
        return thread_budget()
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"DIFFNAS_CPU_STREAMS={value!r}: not a whole number") from None


def compiled_forward(model: nn.Module, streams: int | None = None) -> Callable[..., mx.array]:
    """``model(x, t[, y])`` compiled once per model: fused element-wise ops, fewer graph nodes.

    The weights (and the random state, for dropout) are compile inputs, read at every
    call: a model trained or updated between calls is seen as it is. One trace per
    input shape; the compiled function is kept on the model. With :func:`cpu_streams`
    ``n > 1`` a batch of at least ``n`` is split into ``n`` parts, each run on its own
    CPU stream (the same maths: every layer of the U-Net is per sample); ``streams``
    overrides that count.
    """
    n = cpu_streams() if streams is None else streams
    compiled = model.__dict__.setdefault("_compiled_forward", {})  # not a parameter
    if n not in compiled:
        state = [model.state, mx.random.state]
        call = model.__call__ if n == 1 else _split_call(model, n)

        def forward(*args: mx.array) -> mx.array:
            with forward_only():  # sampling takes no gradient: no custom-function nodes
                return call(*args)  # type: ignore[no-any-return]

        compiled[n] = compile_mode.whole(forward, inputs=state, outputs=[mx.random.state])
    return compiled[n]  # type: ignore[no-any-return]


@cache
def _streams(n: int) -> tuple[mx.Stream, ...]:
    """``n`` CPU streams, made once per process (each is a thread of MLX's scheduler)."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def _split_call(model: nn.Module, n: int) -> Callable[..., mx.array]:
    streams = _streams(n)

    def call(x: mx.array, t: mx.array, *labels: mx.array) -> mx.array:
        if x.shape[0] < n:
            return model(x, t, *labels)  # type: ignore[no-any-return]
        cuts = [x.shape[0] * i // n for i in range(1, n)]
        parts = [mx.split(a, cuts) for a in (x, t, *labels)]
        outs = []
        for s, args in zip(streams, zip(*parts)):
            with mx.stream(s):
                outs.append(model(*args))
        return mx.concatenate(outs, axis=0)

    return call


def balanced_labels(n: int, num_classes: int) -> mx.array:
    """Labels ``0, 1, ..., K-1, 0, 1, ...`` for ``n`` samples: every class equally often."""
    return mx.arange(n, dtype=mx.int32) % num_classes


def denoiser(model: nn.Module, prediction: str, kind: str, clip_x0: bool = True,
             guidance: float = 1.0, labels: mx.array | None = None,
             streams: int | None = None) -> Denoise:
    """Wrap a network as ``denoise(x_t, t) -> (x0, eps)``; optionally clip x0 to [-1, 1].

    A class-conditional network (``num_classes > 0`` in its config) predicts for ``labels``
    (default :func:`balanced_labels` of the batch); with ``guidance`` ``w != 1`` it follows
    ``u + w (c - u)`` of the unconditional (null label) and conditional predictions, both
    from one call on the batch twice over (Ho & Salimans 2022, eq. 6). ``streams``: as
    :func:`compiled_forward`'s.
    """
    forward = compiled_forward(model, streams)
    classes = num_classes_of(model)
    if guidance != 1.0 and classes == 0:
        raise ValueError(f"guidance={guidance:g} needs a class-conditional network")

    def predict(x: mx.array, tt: mx.array) -> mx.array:
        if classes == 0:
            return forward(x, tt)  # type: ignore[no-any-return]
        y = labels if labels is not None else balanced_labels(x.shape[0], classes)
        if guidance == 1.0:
            return forward(x, tt, y)  # type: ignore[no-any-return]
        null = mx.full(y.shape, classes, dtype=y.dtype)
        both = forward(mx.concatenate([x, x]), mx.concatenate([tt, tt]),
                       mx.concatenate([y, null]))
        c, u = mx.split(both, 2)
        return u + guidance * (c - u)

    def denoise(x: mx.array, t: float) -> tuple[mx.array, mx.array]:
        a, s = (float(v) for v in alpha_sigma(t, kind))
        out = predict(x, mx.full((x.shape[0],), t, dtype=mx.float32))
        x0, eps = to_x0_eps(out, x, a, s, prediction)
        if clip_x0:
            x0 = mx.clip(x0, -1.0, 1.0)
            eps = (x - a * x0) / s
        return x0, eps

    return denoise
