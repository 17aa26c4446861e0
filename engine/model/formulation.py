"""Which formulation of the layers runs: the engine's CPU ones, or MLX's own kernels.

The CPU formulations (:mod:`engine.model.conv`'s GEMM convs, the spelled-out attention
with :func:`engine.model.activation.softmax`) exist because MLX's CPU backend runs im2col
copies, naive strided-conv gradients and a one-element-at-a-time ``exp``. On a GPU they
cost more launches than MLX's own fused kernels (cuDNN convs, the fused attention), and a
small model's step there is launch-bound (``benchmarks/gpu/README.md``), so a GPU runs
MLX's own. ``DIFFNAS_LAYERS=cpu`` or ``=mlx`` forces either, to compare.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

CHOICES = ("auto", "cpu", "mlx")


def cpu_layers() -> bool:
    """Whether the CPU formulations run: on MLX's CPU backend unless ``DIFFNAS_LAYERS`` says.

    Read when a model is traced, so a process keeps one choice per default device.

    Raises:
        ValueError: ``DIFFNAS_LAYERS`` is not one of :data:`CHOICES`.
    """
    forced = os.environ.get("DIFFNAS_LAYERS", "auto")
    if forced not in CHOICES:
        raise ValueError(f"DIFFNAS_LAYERS={forced!r}: must be one of {', '.join(CHOICES)}")
    if forced != "auto":
        return forced == "cpu"
    return mx.default_device() == mx.cpu


_FORWARD_ONLY = [0]


@contextmanager
def forward_only() -> Iterator[None]:
    """Trace the layers for a forward pass that no gradient will go through (sampling).

    The CPU formulations state their gradients with ``mx.custom_function``; each call is a
    graph node of its own, and ``mx.compile`` fuses nothing across it (a GroupNorm's
    element-wise tail and the SiLU after it stay two loops). Inside this context the layers
    trace their forward maths alone: the same numbers, fewer nodes
    (``benchmarks/cpu_speed.md``).
    """
    _FORWARD_ONLY[0] += 1
    try:
        yield
    finally:
        _FORWARD_ONLY[0] -= 1


def gradients_stated() -> bool:
    """Whether a layer traced now states its gradient (outside :func:`forward_only`)."""
    return _FORWARD_ONLY[0] == 0
