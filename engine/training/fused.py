"""Optimizer and EMA updates for an engine that runs eagerly: one fused kernel per array
(:class:`FusedAdamW`, the ``fused`` mode), or one update over all arrays at once
(:class:`FlatAdamW`, the default where graphs are not compiled).

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

:class:`FlatAdamW` goes further: the gradients and weights of all arrays are joined into
one vector each, the norm clip and AdamW run once on those, and the arrays are cut back
out as views, so a step costs a few dozen ops besides the joins instead of about 3,600
(and the clip's 4 a array). On an H200, eager, the engine's demo train step at b32 took
39.7 ms against 69.8 ms with MLX's AdamW and 59.6 ms with the fused kernels
(``benchmarks/gpu/optimizer_step.py``, ``benchmarks/gpu/README.md``). Its state tree keeps
MLX's form (``step``, ``learning_rate``, each array's ``m`` and ``v``, as views of the
joined moments), so checkpoints do not change either. :func:`clip_and_update` is the one
place a training step clips and steps, whichever the optimizer.
"""

from __future__ import annotations

from functools import partial
from math import prod
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten


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


def clip_and_update(optimizer: optim.Optimizer, model: nn.Module, grads: dict,
                    grad_clip: float) -> None:
    """One optimizer step on ``model`` after the global gradient-norm clip (none at 0):
    :class:`FlatAdamW` clips the joined gradient itself, any other optimizer is given
    ``optim.clip_grad_norm``'s arrays."""
    if isinstance(optimizer, FlatAdamW):
        model.update(optimizer.apply_gradients(grads, model, grad_clip))
        return
    if grad_clip > 0:
        grads, _ = optim.clip_grad_norm(grads, grad_clip)
    optimizer.update(model, grads)


class FlatAdamW(optim.AdamW):
    """``mlx.optimizers.AdamW(bias_correction=True)`` after ``optim.clip_grad_norm(grads,
    grad_clip)`` (no clip at 0), computed once over all arrays joined into one vector.

    Arrays of more than one dtype are updated per array instead, by MLX's AdamW. The joined
    moments are kept between steps and rebuilt from the state tree when that is assigned
    (a checkpoint loaded) or when the arrays trained change (a module frozen or thawed).
    """

    def __init__(self, learning_rate: Any, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(learning_rate, list(betas), eps, weight_decay, bias_correction=True)
        self._moments: tuple[tuple[str, ...], mx.array, mx.array] | None = None

    @property
    def state(self) -> dict:
        return self._state  # type: ignore[no-any-return]

    @state.setter
    def state(self, state: dict) -> None:
        self._moments = None  # whatever was joined belongs to the state replaced
        optim.Optimizer.state.fset(self, state)  # type: ignore[attr-defined]

    def apply_gradients(self, gradients: dict, parameters: dict,
                        grad_clip: float = 0.0) -> dict:
        names, grads = zip(*tree_flatten(gradients))
        if len({g.dtype for g in grads}) != 1:
            if grad_clip > 0:
                gradients, _ = optim.clip_grad_norm(gradients, grad_clip)
            self._moments = None
            return super().apply_gradients(gradients, parameters)  # type: ignore[no-any-return]
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1

        weights = dict(tree_flatten(parameters))
        per_array = [_node(self.state, n) for n in names]
        g = join(grads)
        if grad_clip > 0:
            g = g * mx.minimum(grad_clip / (mx.sqrt(mx.sum(g * g)) + 1e-6), 1.0)
        if self._moments is None or self._moments[0] != names:  # first, loaded, or re-frozen
            self._moments = (names, join([s["m"] for s in per_array]),
                             join([s["v"] for s in per_array]))
        _, m, v = self._moments
        b1, b2 = self.betas
        lr, step = self.learning_rate.astype(g.dtype), self.step
        w = join([weights[n] for n in names]) * (1 - lr * self.weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * mx.square(g)
        c1 = (lr / (1 - b1**step)).astype(g.dtype)
        c2 = mx.rsqrt(1 - b2**step).astype(g.dtype)
        w = w - (c1 * m) / (mx.sqrt(v) * c2 + self.eps)
        self._moments = (names, m, v)
        shapes = [a.shape for a in grads]
        for s, m_i, v_i in zip(per_array, cut(m, shapes), cut(v, shapes)):
            s["m"], s["v"] = m_i, v_i
        return tree_unflatten(list(zip(names, cut(w, shapes))))  # type: ignore[no-any-return]


def join(arrays: list[mx.array] | tuple[mx.array, ...]) -> mx.array:
    """``arrays`` flattened and joined end to end into one vector."""
    return mx.concatenate([a.reshape(-1) for a in arrays])


def cut(flat: mx.array, shapes: list[tuple[int, ...]]) -> list[mx.array]:
    """:func:`join`'s vector back into arrays of ``shapes``, in order: views, no copies."""
    out, start = [], 0
    for shape in shapes:
        size = prod(shape)
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def _node(tree: Any, name: str) -> Any:
    """The entry of a nested dict/list tree at a ``tree_flatten`` name (``a.0.b``)."""
    for key in name.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree
