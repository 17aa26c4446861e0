"""SiLU from multiplies and one divide, for MLX's CPU backend.

MLX's CPU ``exp``/``sigmoid`` evaluate one element at a time (each fused multiply-add a
call into libm): about 15 ns an element, more than the GEMM work per element of a demo
3x3 conv. Here ``sigmoid(x) = (1 + tanh(x / 2)) / 2`` with ``tanh`` the rational
approximation of Eigen's ``generic_fast_tanh_float`` (odd degree-13 over even degree-6
polynomial on [-9, 9], +-1 beyond; float32-accurate to a few ulp): element-wise ops
only, which ``mx.compile`` fuses into one vectorised loop (about 10x faster).
:func:`silu` states its derivative ``s (1 + x (1 - s))``, so the backward pass is one
fused loop as well.
"""

from __future__ import annotations

import mlx.core as mx

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


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` (Elfwing et al. 2018) with the rational :func:`sigmoid`."""
    return _silu(x)


@silu.vjp
def _silu_vjp(x: mx.array, dy: mx.array, _: mx.array) -> mx.array:
    return _silu_grad(x, dy)  # one primal: MLX passes the array itself, not a tuple
