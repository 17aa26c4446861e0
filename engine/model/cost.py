"""Analytic cost of a U-Net, without building it: parameters, FLOPs, activation sizes.

:func:`block_layers` prices one block of :func:`engine.model.blocks.walk` as the
weight-bearing ops it runs, one :class:`Layer` each; :func:`layers` does so for every
block. The search uses these numbers for its free pre-screen, the memory model for
activation sizes, and the latency predictor for its per-block FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import UNetConfig
from engine.model.blocks import Block, walk


@dataclass(frozen=True)
class Layer:
    """One op at batch 1. ``flops`` counts a multiply-add as 2; sizes are in elements."""

    name: str
    kind: str  # conv | dwconv | convT | linear | attention | norm
    params: int
    flops: int
    out_elems: int
    resolution: int
    cin: int
    cout: int


def _conv(name: str, res: int, cin: int, cout: int, k: int, groups: int = 1) -> Layer:
    params = k * k * (cin // groups) * cout + cout
    flops = 2 * res * res * k * k * (cin // groups) * cout
    kind = "dwconv" if groups > 1 else "conv"
    return Layer(name, kind, params, flops, res * res * cout, res, cin, cout)


def _conv3(name: str, res: int, cin: int, cout: int, separable: bool) -> list[Layer]:
    if separable:
        return [_conv(f"{name}.dw", res, cin, cin, 3, groups=cin),
                _conv(f"{name}.pw", res, cin, cout, 1)]
    return [_conv(name, res, cin, cout, 3)]


def _linear(name: str, rows: int, fin: int, fout: int, res: int = 1) -> Layer:
    return Layer(name, "linear", fin * fout + fout, 2 * rows * fin * fout, rows * fout, res, fin,
                 fout)


def _norm(name: str, res: int, c: int) -> Layer:
    return Layer(name, "norm", 2 * c, 8 * res * res * c, res * res * c, res, c, c)


def _time(cfg: UNetConfig, block: Block) -> list[Layer]:
    out = [_linear("time_in", 1, block.cin, cfg.time_emb_dim),
           _linear("time_out", 1, cfg.time_emb_dim, block.cout)]
    if cfg.num_classes > 0:  # the label embedding: a one-hot linear without bias, then an add
        k, d = cfg.num_classes + 1, cfg.time_emb_dim
        out.append(Layer("label_emb", "linear", k * d, d, d, 1, k, d))
    return out


def _resblock(cfg: UNetConfig, block: Block) -> list[Layer]:
    name, res, cin, cout = block.name, block.res, block.cin, block.cout
    out = [_norm(f"{name}.norm1", res, cin)]
    out += _conv3(f"{name}.conv1", res, cin, cout, cfg.separable)
    out.append(_linear(f"{name}.temb", 1, cfg.time_emb_dim, cout, res))
    out.append(_norm(f"{name}.norm2", res, cout))
    out += _conv3(f"{name}.conv2", res, cout, cout, cfg.separable)
    if cin != cout:
        out.append(_conv(f"{name}.skip", res, cin, cout, 1))
    return out


def _attention(cfg: UNetConfig, block: Block) -> list[Layer]:
    name, res, c = block.name, block.res, block.cout
    n = res * res
    core = Layer(f"{name}.sdpa", "attention", 0, 4 * n * n * c, n * c, res, c, c)
    return [_norm(f"{name}.norm", res, c), _linear(f"{name}.qkv", n, c, 3 * c, res), core,
            _linear(f"{name}.out", n, c, c, res)]


def _downsample(cfg: UNetConfig, block: Block) -> list[Layer]:
    return [_conv(block.name, block.res // 2, block.cin, block.cout, 3)]


def _upsample(cfg: UNetConfig, block: Block) -> list[Layer]:
    res, c = block.res, block.cout
    if cfg.resample == "nearest":
        return [_conv(block.name, 2 * res, c, c, 3)]
    # A 4x4 stride-2 transposed conv scatters each input pixel into a 4x4 patch.
    return [Layer(block.name, "convT", 16 * c * c + c, 2 * res * res * 16 * c * c,
                  4 * res * res * c, 2 * res, c, c)]


def _out(cfg: UNetConfig, block: Block) -> list[Layer]:
    return [_norm("norm_out", block.res, block.cin),
            _conv("conv_out", block.res, block.cin, block.cout, 3)]


_PRICES = {
    "time": _time,
    "conv_in": lambda cfg, b: [_conv("conv_in", b.res, b.cin, b.cout, 3)],
    "res": _resblock,
    "attn": _attention,
    "down": _downsample,
    "up": _upsample,
    "out": _out,
}


def block_layers(cfg: UNetConfig, block: Block) -> list[Layer]:
    """The weight-bearing ops of one block of ``cfg``'s U-Net, in execution order, at batch 1."""
    return _PRICES[block.kind](cfg, block)


def layers(cfg: UNetConfig) -> list[Layer]:
    """Every weight-bearing op of the U-Net for ``cfg``, in execution order, at batch 1."""
    return [layer for block in walk(cfg) for layer in block_layers(cfg, block)]


def param_count(cfg: UNetConfig) -> int:
    """Number of trainable parameters of the U-Net for ``cfg``."""
    return sum(layer.params for layer in layers(cfg))


def flops(cfg: UNetConfig) -> int:
    """FLOPs of one forward pass at batch 1 (a multiply-add counts as 2)."""
    return sum(layer.flops for layer in layers(cfg))
