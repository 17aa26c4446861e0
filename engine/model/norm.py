"""GroupNorm without layout copies, for MLX's CPU backend.

``nn.GroupNorm(pytorch_compatible=True)`` transposes (B, HW, G, C/G) to (B, G, HW, C/G)
and back around a layer norm: two full copies per norm and about 20 graph nodes. The
same statistics (Wu & He 2018: mean and biased variance over the spatial positions and
the channels of a group, ``eps`` inside the root) are sums over the positions per
channel, then per group, and ``mx.compile`` fuses the element-wise rest.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx
from mlx import nn

from engine.device.compile_mode import whole_graph


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm(groups, dims, pytorch_compatible=True)``: same parameters and maths."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5):
        super().__init__(num_groups, dims, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        return _group_norm(self.num_groups, self.eps, whole_graph())(x, self.weight, self.bias)


@cache
def _group_norm(groups: int, eps: float,
                fenced: bool) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """The norm; ``fenced`` where graphs are compiled (:func:`whole_graph`).

    Each statistic is a sum over the positions (a reduction along contiguous channel rows,
    which MLX's CPU runs fast), then over the C / G channels of a group (tiny); a reduction
    over axes (1, 3) of (B, P, G, C / G) strides through the whole map and ran 2-3x slower.
    The variance stays the centred two-pass one.

    Compiled, the norm is ``x * scale + shift`` with ``scale`` and ``shift`` per sample and
    channel, closed into kernels of their own by ``mx.contiguous``. Without the fences
    ``mx.compile`` fused the division, the root and the products on the (B, 1, C)
    statistics into the (B, P, C) kernel, where they ran once per element: that kernel was
    9% of the demo's DDIM-20 at batch 16, and the norm alone 1.8-2.8x slower at batch 8 to
    32 (``benchmarks/cpu_speed.md``, session 15). Eager (an MLX CUDA GPU by default) every
    op is a kernel launch of its own, and the fences and the extra product cost more than
    they save (the demo 7-12% slower on an H200): there it stays
    ``(x - mean) * (rstd * weight) + bias``.
    """

    @mx.compile
    def norm(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        n = rows.shape[1] * (rows.shape[2] // groups)
        mean = _per_channel(rows.sum(axis=1, keepdims=True), groups) / n
        xc = rows - (mx.contiguous(mean) if fenced else mean)
        rstd = mx.rsqrt(_per_channel((xc * xc).sum(axis=1, keepdims=True), groups) / n + eps)
        if not fenced:
            return (xc * (rstd * weight) + bias).reshape(x.shape)
        scale = mx.contiguous(rstd * weight)
        shift = mx.contiguous(bias - mean * scale)
        return (rows * scale + shift).reshape(x.shape)

    return norm


def _per_channel(sums: mx.array, groups: int) -> mx.array:
    """Per-channel sums (B, 1, C) -> their group's total, repeated per channel: (B, 1, C).
    (Kept dims: a reduction that drops its axis is a Sum and a Squeeze node.)"""
    b, _, c = sums.shape
    total = sums.reshape(b, groups, c // groups).sum(axis=-1, keepdims=True)
    return mx.broadcast_to(total, (b, groups, c // groups)).reshape(b, 1, c)
