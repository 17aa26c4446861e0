"""Per-parameter updates as one fused kernel each, for an engine that runs eagerly.

Where whole graphs are not compiled (MLX's CUDA backend; the ``fused`` mode of
:mod:`engine.device.compile_mode` uses this module) every element-wise op is a kernel
launch of its own. MLX 0.32.4's AdamW runs 22 ops per parameter array (6 of them the bias
corrections, computed again for every array; counted in ``Adam.apply_single``), and the
EMA 3 more: with the demo U-Net's 143 arrays, about 3,600 ops a step besides the forward
and backward passes.

Here each array's AdamW update is one ``mx.compile(shapeless=True)`` function, whose
bias corrections are computed once per step; the EMA update is another. A shapeless
function is traced once per dtype and rank, not per shape, so it builds a handful of
kernels (NVRTC, cached on disk by :mod:`engine.device.kernel_cache`), not one per layer.
The maths is MLX's AdamW with ``bias_correction=True`` (a fused kernel may contract a
multiply and an add, so results agree to float32 rounding, not bit for bit); its state
(``step``, ``learning_rate``, per-array ``m`` and ``v``) is the same, so checkpoints do not
change.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map


@partial(mx.compile, shapeless=True)
def _adamw(g: mx.array, w: mx.array, m: mx.array, v: mx.array, lr: mx.array,
           c1: mx.array, c2: mx.array, hyper: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """One array's AdamW step; ``hyper`` = (b1, 1 - b1, b2, 1 - b2, eps, weight decay),
    ``c1``/``c2`` the step's bias corrections (as in ``mlx.optimizers.Adam.apply_single``)."""
    b1, one_b1, b2, one_b2, eps, wd = (hyper[i] for i in range(6))
    w = w * (1 - lr * wd)
    m = b1 * m + one_b1 * g
    v = b2 * v + one_b2 * mx.square(g)
    return w - (c1 * m) / (mx.sqrt(v) * c2 + eps), m, v


@partial(mx.compile, shapeless=True)
def _ema(e: mx.array, p: mx.array, d: mx.array, one_d: mx.array) -> mx.array:
    return d * e + one_d * p


class FusedAdamW(optim.AdamW):
    """``mlx.optimizers.AdamW(bias_correction=True)`` with one fused kernel per array."""

    def __init__(self, learning_rate: Any, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(learning_rate, list(betas), eps, weight_decay, bias_correction=True)
        self._step_constants: tuple[mx.array, ...] | None = None  # this step's, built once

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        self._step_constants = None
        return super().apply_gradients(gradients, parameters)  # calls apply_single per array

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if self._step_constants is None:  # the step and learning rate are this step's now
            b1, b2 = self.betas
            lr, step = self.learning_rate.astype(mx.float32), self.step
            self._step_constants = (
                lr, (lr / (1 - b1**step)).astype(mx.float32),
                mx.rsqrt(1 - b2**step).astype(mx.float32),
                mx.array([b1, 1 - b1, b2, 1 - b2, self.eps, self.weight_decay], mx.float32))
        dt = gradient.dtype
        lr, c1, c2, hyper = (c.astype(dt) for c in self._step_constants)
        w, state["m"], state["v"] = _adamw(gradient, parameter, state["m"], state["v"], lr,
                                           c1, c2, hyper)
        return w


def ema_update(ema: dict, params: dict, decay: float) -> dict:
    """``decay * ema + (1 - decay) * params``, one fused kernel per array."""
    d, one_d = mx.array(decay, mx.float32), mx.array(1 - decay, mx.float32)
    return tree_map(lambda e, p: _ema(e, p, d.astype(e.dtype), one_d.astype(e.dtype)),
                    ema, params)
