"""SiLU and softmax from multiplies and one divide, for MLX's CPU backend.

MLX's CPU ``exp``/``sigmoid`` evaluate one element at a time (each fused multiply-add a
call into libm): about 15 ns an element, more than the GEMM work per element of a demo
3x3 conv. Here ``sigmoid(x) = (1 + tanh(x / 2)) / 2`` with ``tanh`` the rational
approximation of Eigen's ``generic_fast_tanh_float`` (odd degree-13 over even degree-6
polynomial on [-9, 9], +-1 beyond; float32-accurate to a few ulp): element-wise ops
only, which ``mx.compile`` fuses into one vectorised loop (about 10x faster).
:func:`silu` states its derivative ``s (1 + x (1 - s))``, so the backward pass is one
fused loop as well. :func:`softmax` (attention's) uses :func:`exp` by Cephes' range
reduction ``e^x = 2^n e^r``: a degree-7 polynomial for ``e^r`` and ``2^n`` written
straight into the float's exponent bits (3 ns instead of 24 ns an element; max. relative
error vs float64 8e-8, MLX's own ``exp`` 4e-6).
"""

from __future__ import annotations

import mlx.core as mx

from engine.model.formulation import gradients_stated

# tanh(x) ~ x P(x^2) / Q(x^2); coefficients highest degree first (Eigen, MathFunctionsImpl.h).
_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
      5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
      4.89352455891786e-03)
_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
      4.89352518554385e-03)
_CLAMP = 9.0  # |tanh| rounds to 1 in float32 beyond this


def tanh(x: mx.array) -> mx.array:
    """``tanh(x)`` as a clamped rational function (no transcendental call)."""
    x = mx.clip(x, -_CLAMP, _CLAMP)
    x2 = x * x
    p: mx.array | float = _P[0]
    q: mx.array | float = _Q[0]
    for c in _P[1:]:
        p = p * x2 + c
    for c in _Q[1:]:
        q = q * x2 + c
    return x * p / q


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e^-x)``, as ``(1 + tanh(x / 2)) / 2``."""
    return 0.5 + 0.5 * tanh(0.5 * x)


@mx.compile
def _silu(x: mx.array) -> mx.array:
    return x * sigmoid(x)


@mx.compile
def _silu_grad(x: mx.array, dy: mx.array) -> mx.array:
    s = sigmoid(x)
    return dy * s * (1.0 + x * (1.0 - s))


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` (Elfwing et al. 2018) with the rational :func:`sigmoid`; its
    derivative stated, unless traced for a forward pass alone
    (:func:`engine.model.formulation.forward_only`)."""
    return _silu_stated(x) if gradients_stated() else _silu(x)


@mx.custom_function
def _silu_stated(x: mx.array) -> mx.array:
    return _silu(x)


@_silu_stated.vjp
def _silu_vjp(x: mx.array, dy: mx.array, _: mx.array) -> mx.array:
    return _silu_grad(x, dy)  # one primal: MLX passes the array itself, not a tuple


# Cephes expf: ln 2 split in two for an exact range reduction; e^r - 1 - r - r^2/2 ... on
# |r| <= ln(2) / 2, coefficients highest degree first.
_LN2_HI, _LN2_LO, _LOG2E = 0.693359375, -2.12194440e-4, 1.4426950408889634
_E = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
      1.6666665459e-1, 5.0000001201e-1)


def exp(x: mx.array) -> mx.array:
    """``e^x`` (clamped to [-87, 88], float32's normal range), no transcendental call.

    Computed in float32 (the exponent bits are float32's) and returned in ``x``'s dtype.
    """
    dtype = x.dtype
    x = mx.clip(x.astype(mx.float32), -87.0, 88.0)
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p: mx.array | float = _E[0]
    for c in _E[1:]:
        p = p * r + c
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
    return ((p * r * r + r + 1.0) * two_n).astype(dtype)


@mx.compile
def _softmax(x: mx.array) -> mx.array:
    e = exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.compile
def _softmax_grad(p: mx.array, dp: mx.array) -> mx.array:
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def softmax(x: mx.array) -> mx.array:
    """``softmax(x)`` over the last axis, with the polynomial :func:`exp`; its derivative
    stated, unless traced for a forward pass alone."""
    return _softmax_stated(x) if gradients_stated() else _softmax(x)


@mx.custom_function
def _softmax_stated(x: mx.array) -> mx.array:
    return _softmax(x)


@_softmax_stated.vjp
def _softmax_vjp(x: mx.array, dp: mx.array, p: mx.array) -> mx.array:
    return _softmax_grad(p, dp)
