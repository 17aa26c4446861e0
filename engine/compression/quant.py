"""Weight-only int8/int4 quantization for the convolutions and linears of a U-Net.

``nn.quantize`` converts only ``Linear`` and ``Embedding``; a U-Net is mostly convs. A
:class:`QuantizedConv` keeps each output channel's weights as symmetric integers with one
float scale per channel, ``w[c] ~= scale[c] * q[c]`` with ``|q| <= 2**(bits-1) - 1``
(Jacob et al. 2018, per-channel weights as in Krishnamoorthi 2018), and dequantizes at run
time before the float conv. int4 values are packed two per byte, so the weights on disk
and in memory shrink 4x (int8) or 8x (int4) against float32. Linears go through
``nn.quantize`` (MLX's group-wise affine quantized matmul) where their input width is a
multiple of the group size; narrower ones stay float (they are a few hundred weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map_with_path

__all__ = [
    "BITS",
    "KEEP_FLOAT",
    "QuantizedConv",
    "dequantize_per_channel",
    "quantize_model",
    "quantize_per_channel",
]

BITS = (8, 4)
LINEAR_GROUP = 32


def _qmax(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r}: must be one of {BITS}")
    return 2 ** (bits - 1) - 1


def quantize_per_channel(w: mx.array, bits: int) -> tuple[mx.array, mx.array]:
    """Symmetric per-output-channel quantization of ``w`` (axis 0 = output channel).

    Returns:
        ``(q, scale)``: ``q`` int8 of shape (C, K) for 8 bits, or uint8 (C, ceil(K/2))
        holding two 4-bit codes per byte for 4 bits; ``scale`` float32 (C,). Every
        weight then satisfies ``|w - scale * code| <= scale / 2``.
    """
    qmax = _qmax(bits)
    flat = w.astype(mx.float32).reshape(w.shape[0], -1)  # (C, K)
    scale = mx.max(mx.abs(flat), axis=1) / qmax
    scale = mx.where(scale > 0, scale, 1.0)
    codes = mx.clip(mx.round(flat / scale[:, None]), -qmax, qmax).astype(mx.int8)
    if bits == 8:
        return codes, scale
    if codes.shape[1] % 2:
        codes = mx.concatenate([codes, mx.zeros((codes.shape[0], 1), mx.int8)], axis=1)
    nibbles = (codes + 8).astype(mx.uint8)  # [-7, 7] -> [1, 15]
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize_per_channel(q: mx.array, scale: mx.array, bits: int,
                           shape: tuple[int, ...]) -> mx.array:
    """Inverse of :func:`quantize_per_channel`; returns ``shape`` in ``scale``'s dtype."""
    k = 1
    for d in shape[1:]:
        k *= d
    if bits == 4:
        pairs = mx.stack([q & 15, q >> 4], axis=-1)  # (C, ceil(K/2), 2)
        codes = pairs.reshape(q.shape[0], -1)[:, :k].astype(mx.int8) - 8
    else:
        codes = q
    return (codes.astype(scale.dtype) * scale[:, None]).reshape(shape)


@dataclass(frozen=True)
class _ConvSpec:
    transposed: bool
    shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    output_padding: tuple[int, int]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class QuantizedConv(nn.Module):
    """A ``Conv2d`` or ``ConvTranspose2d`` whose weights are int8/int4 per output channel.

    Build with :meth:`from_conv`; the call dequantizes the weights and runs the float op.
    """

    def __init__(self, spec: _ConvSpec, bits: int, q: mx.array, scale: mx.array,
                 bias: mx.array | None):
        super().__init__()
        self.spec = spec
        self.bits = bits
        self.qweight = q
        self.scales = scale
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d | nn.ConvTranspose2d, bits: int) -> QuantizedConv:
        transposed = isinstance(conv, nn.ConvTranspose2d)
        spec = _ConvSpec(transposed, tuple(conv.weight.shape), _pair(conv.stride),
                         _pair(conv.padding), _pair(conv.dilation),
                         1 if transposed else int(conv.groups),
                         _pair(getattr(conv, "output_padding", 0)))
        q, scale = quantize_per_channel(conv.weight, bits)
        scale = scale.astype(conv.weight.dtype)
        return cls(spec, bits, q, scale, conv.bias if "bias" in conv else None)

    def weight(self) -> mx.array:
        """The dequantized weight, (C_out, kH, kW, C_in / groups)."""
        return dequantize_per_channel(self.qweight, self.scales, self.bits, self.spec.shape)

    def __call__(self, x: mx.array) -> mx.array:
        s = self.spec
        if s.transposed:
            y = mx.conv_transpose2d(x, self.weight(), s.stride, s.padding, s.dilation,
                                    s.output_padding)
        else:
            y = mx.conv2d(x, self.weight(), s.stride, s.padding, s.dilation, s.groups)
        return y + self.bias if "bias" in self else y


KEEP_FLOAT = ("conv_in", "conv_out")
"""The U-Net's first and last convs: their error goes straight into the input features or
the prediction (the usual first/last-layer exception), for ~0.1% of the weights."""


def quantize_model(model: nn.Module, bits: int, linear_group: int = LINEAR_GROUP,
                   keep_float: tuple[str, ...] = KEEP_FLOAT) -> None:
    """Quantize every conv (per output channel) and every wide-enough linear, in place.

    Args:
        model: any module; norms and other layers stay float.
        bits: 8 or 4.
        linear_group: group size of ``nn.quantize`` for linears; a linear whose input
            width is not a multiple of it stays float.
        keep_float: module paths left unquantized.
    """
    _qmax(bits)

    def convert(path: str, m: nn.Module) -> nn.Module:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and path not in keep_float:
            return QuantizedConv.from_conv(m, bits)
        return m

    model.update_modules(tree_map_with_path(convert, model.leaf_modules(),
                                            is_leaf=nn.Module.is_module))
    nn.quantize(model, linear_group, bits, class_predicate=lambda _, m: (
        isinstance(m, nn.Linear) and m.weight.shape[1] % linear_group == 0))
