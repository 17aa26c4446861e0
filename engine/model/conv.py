"""2-D convolutions whose forward and gradients are plain GEMMs, for MLX's CPU backend.

The maths is that of ``mx.conv2d``; only the formulation changes. MLX's CPU gradient of
a strided conv runs a naive loop (its input-dilated transposed conv), and its im2col
copies dominate a 3x3 conv at these widths. Here, for ``y = conv(x, W)`` with ``x``
(B, H, W, Cin), ``W`` (Cout, k, k, Cin) and ``x_p`` the zero-padded input:

* **same-size conv** (stride 1, padding ``p = k // 2``): on the rows of ``x_p``
  flattened to (B*Hp*Wp, Cin), tap ``(i, j)`` is a shift by ``o_ij = i*Wp + j`` rows, so
  ``Y[r] = sum_ij X_p[r + o_ij] @ W_ij^T``, ``dW_ij = dY^T @ X_p[. + o_ij]`` and
  ``dX_p[q] = sum_ij dY[q - o_ij] @ W_ij``: k*k GEMMs each, on contiguous row windows,
  no im2col copy. Rows outside the image (the pad ring) are computed and cropped. A
  small batch (sampling at batch 1) runs its forward by ``mx.conv2d``: there the k*k
  GEMMs cost more graph nodes than they save work.
* **strided conv**: forward by ``mx.conv2d``; ``dW = patches(x_p)^T @ dY`` (one GEMM) and
  ``dX`` the stride-1 conv of the zero-dilated ``dY`` with the flipped kernel (the
  transposed conv written as a plain conv, which MLX runs as im2col + GEMM).
* **1x1 conv**: a matmul, whose gradients are matmuls.

On a GPU the layer is MLX's own conv (cuDNN there): the k*k GEMMs and their sums are k*k
kernel launches where one sufficed (:mod:`engine.model.formulation`).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx import nn

from engine.model.formulation import cpu_layers, gradients_stated

_MIN_ROWS = 1024  # padded-grid rows from which the shifted-GEMM forward is used
_MAX_RING = 1.3  # padded grid / image: above it the padding ring is too much extra work


def shifted_forward(batch: int, height: int, width: int, k: int = 3) -> bool:
    """Whether a same-size ``k x k`` conv's forward runs as shifted GEMMs (else ``mx.conv2d``).

    The GEMMs run over the whole padded grid: at 8 px its ring is 56% extra rows and
    ``mx.conv2d`` was faster (DDIM-20 of the demo U-Net at batch 16: 7.7% less time, paired
    A/B, ``benchmarks/cpu_speed.md``); at 16 px (27%) the GEMMs were. Below ``_MIN_ROWS``
    padded rows the k*k GEMMs cost more graph nodes than work.
    """
    padded = (height + k - 1) * (width + k - 1)
    return batch * padded >= _MIN_ROWS and padded <= _MAX_RING * height * width


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and shapes) computed by :func:`conv2d` on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        (sh, sw), (ph, pw), (kh, kw) = self.stride, self.padding, self.weight.shape[1:3]
        if (self.dilation not in (1, (1, 1)) or sh != sw or ph != pw or kh != kw
                or not cpu_layers()):
            return super().__call__(x)  # not a case conv2d covers: MLX's own conv
        y = conv2d(x, self.weight, self.stride[0], self.padding[0], self.groups)
        return y + self.bias if "bias" in self else y


def conv2d(x: mx.array, w: mx.array, stride: int = 1, padding: int = 0,
           groups: int = 1) -> mx.array:
    """``mx.conv2d(x, w, stride, padding, groups=groups)`` with GEMM gradients.

    Args:
        x: input, (B, H, W, Cin).
        w: square kernel, (Cout, k, k, Cin // groups).
        stride: the same along both axes.
        padding: zeros on every side.
        groups: grouped convs (depthwise) fall back to ``mx.conv2d``.

    Returns:
        (B, Ho, Wo, Cout).
    """
    k = w.shape[1]
    if groups != 1:
        return mx.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    if k == 1 and stride == 1 and padding == 0:
        return mx.matmul(x, w.reshape(w.shape[0], -1).T)
    stated = gradients_stated()  # else a forward pass alone: no custom-function node
    if stride == 1 and 2 * padding == k - 1:
        return _same(k)(x, w) if stated else _same_forward(x, w, k)  # type: ignore[no-any-return,return-value]
    if stated:
        return _strided(stride, padding)(x, w)  # type: ignore[return-value]
    return mx.conv2d(x, w, stride=stride, padding=padding)  # _strided's forward


def _shifted_gemm(rows: mx.array, taps: list[mx.array], shifts: list[int], n: int) -> mx.array:
    """``sum_t rows[s_t : s_t + n] @ taps[t]``, accumulated inside the GEMM (``addmm``)."""
    acc = rows[shifts[0]:shifts[0] + n] @ taps[0]
    for tap, s in zip(taps[1:], shifts[1:]):
        acc = mx.addmm(acc, rows[s:s + n], tap)
    return acc


def _taps(w: mx.array, transpose: bool) -> list[mx.array]:
    """The k*k taps of ``w`` (Cout, k, k, Cin) as contiguous (Cin, Cout) matrices
    (``transpose``) or (Cout, Cin): row blocks of one reordered copy of ``w``, a graph node
    each. ``w[:, i, j, :].T`` costs three nodes a tap (slice, squeeze, transpose), and its
    row stride (k*k*Cin) is not one MLX's CPU matmul hands to BLAS, so every GEMM copied it."""
    cout, k, _, cin = w.shape
    order, rows = ((1, 2, 3, 0), cin) if transpose else ((1, 2, 0, 3), cout)
    flat = w.transpose(order).reshape(k * k * rows, -1)
    return [flat[t * rows:(t + 1) * rows] for t in range(k * k)]


def _padded_rows(x: mx.array, p: int) -> mx.array:
    """``x`` zero-padded by ``p`` on both spatial sides, as rows (B*Hp*Wp, C)."""
    return mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)]).reshape(-1, x.shape[-1])


def _geometry(x: mx.array, k: int) -> tuple[int, int, list[int]]:
    """The padded grid of a same-size ``k x k`` conv of ``x``: its height, width and the
    row offset of each tap in the flattened grid."""
    p = k // 2
    wp = x.shape[2] + 2 * p
    return x.shape[1] + 2 * p, wp, [i * wp + j for i in range(k) for j in range(k)]


def _same_forward(x: mx.array, w: mx.array, k: int) -> mx.array:
    """The same-size ``k x k`` conv's forward: shifted GEMMs, or ``mx.conv2d`` on few rows."""
    p = k // 2
    if not shifted_forward(x.shape[0], x.shape[1], x.shape[2], k):
        return mx.conv2d(x, w, padding=p)
    (b, h, wd, _), cout = x.shape, w.shape[0]
    hp, wp, shifts = _geometry(x, k)
    rows = _padded_rows(x, p)
    n = rows.shape[0] - shifts[-1]  # output rows whose every tap lies inside x_p
    y = _shifted_gemm(rows, _taps(w, transpose=True), shifts, n)
    # output (b, i, j) is row b*Hp*Wp + i*Wp + j of y: a strided view, with no padded copy
    return mx.as_strided(y, (b, h, wd, cout), (hp * wp * cout, wp * cout, cout, 1))


@cache
def _same(k: int) -> mx.custom_function:
    """The same-size ``k x k`` conv (stride 1, padding ``k // 2``) as shifted GEMMs, with
    GEMM gradients."""
    p = k // 2

    @mx.custom_function
    def conv(x: mx.array, w: mx.array) -> mx.array:
        return _same_forward(x, w, k)

    @conv.vjp
    def conv_vjp(primals: tuple[mx.array, mx.array], dy: mx.array,
                 _: mx.array) -> tuple[mx.array, mx.array]:
        x, w = primals
        (b, h, wd, cin), cout = x.shape, w.shape[0]
        hp, wp, shifts = _geometry(x, k)
        rows, last = _padded_rows(x, p), shifts[-1]
        n = rows.shape[0] - last
        # dY on the padded grid, zero on the ring, as rows shifted by ``last`` (the ring's
        # 2p rows and columns come first) and followed by one image of zeros: one copy.
        dy_rows = mx.pad(dy, [(0, 1), (2 * p, 0), (2 * p, 0), (0, 0)]).reshape(-1, cout)
        dy_t = dy_rows[last:last + n].T
        dw = mx.stack([dy_t @ rows[s:s + n] for s in shifts], axis=1).reshape(cout, k, k, cin)
        dx = _shifted_gemm(dy_rows, _taps(w, transpose=False), [last - s for s in shifts],
                           rows.shape[0])
        return dx.reshape(b, hp, wp, cin)[:, p:p + h, p:p + wd, :], dw

    return conv


@cache
def _strided(stride: int, padding: int) -> mx.custom_function:
    """A conv with any stride and padding: forward by MLX, gradients as GEMM convs."""

    @mx.custom_function
    def conv(x: mx.array, w: mx.array) -> mx.array:
        return mx.conv2d(x, w, stride=stride, padding=padding)

    @conv.vjp
    def conv_vjp(primals: tuple[mx.array, mx.array], dy: mx.array,
                 _: mx.array) -> tuple[mx.array, mx.array]:
        x, w = primals
        (b, h, wd, cin), (cout, k) = x.shape, w.shape[:2]
        ho, wo = dy.shape[1:3]
        xp = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
        hp, wp = xp.shape[1:3]
        # patches (B*Ho*Wo, k*k*Cin), in the (i, j, c) order of W's trailing axes
        patches = mx.as_strided(xp, (b, ho, wo, k, k, cin),
                                (hp * wp * cin, stride * wp * cin, stride * cin, wp * cin,
                                 cin, 1)).reshape(b * ho * wo, k * k * cin)
        dw = (dy.reshape(-1, cout).T @ patches).reshape(cout, k, k, cin)
        # dX[u] = sum_i dilate(dY)[u + padding - i] W_i: a stride-1 conv of the dilated dY,
        # cut or zero-extended to H + padding rows, k - 1 - padding zeros before, flipped W.
        dyd = _dilate(dy, stride)[:, :h + padding, :wd + padding]
        q = k - 1 - padding
        dyd = mx.pad(dyd, [(0, 0), (q, h + padding - dyd.shape[1]),
                           (q, wd + padding - dyd.shape[2]), (0, 0)])
        return mx.conv2d(dyd, w[:, ::-1, ::-1, :].transpose(3, 1, 2, 0)), dw

    return conv


def _dilate(dy: mx.array, s: int) -> mx.array:
    """``s - 1`` zeros after every row and column of ``dy``: (B, H, W, C) -> (B, sH, sW, C)."""
    if s == 1:
        return dy
    b, h, w, c = dy.shape
    z = mx.concatenate([dy[:, :, None, :, None, :],
                        mx.zeros((b, h, 1, w, s - 1, c), dy.dtype)], axis=4)
    z = mx.concatenate([z, mx.zeros((b, h, s - 1, w, s, c), dy.dtype)], axis=2)
    return z.reshape(b, h * s, w * s, c)
