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
