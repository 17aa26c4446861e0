"""Analytic cost of a U-Net, without building it: parameters, FLOPs, activation sizes.

:func:`layers` walks the architecture exactly as :class:`engine.model.unet.UNet` builds it
and yields one :class:`Layer` per weight-bearing op. The parameter total is checked
against the built model in the tests, which keeps the two walks in step. The search
uses these numbers for its free pre-screen, the memory model for activation sizes,
and the latency predictor for its per-layer features.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import UNetConfig


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


def _resblock(cfg: UNetConfig, name: str, res: int, cin: int, cout: int) -> list[Layer]:
    out = [_norm(f"{name}.norm1", res, cin)]
    out += _conv3(f"{name}.conv1", res, cin, cout, cfg.separable)
    out.append(_linear(f"{name}.temb", 1, cfg.time_emb_dim, cout, res))
    out.append(_norm(f"{name}.norm2", res, cout))
    out += _conv3(f"{name}.conv2", res, cout, cout, cfg.separable)
    if cin != cout:
        out.append(_conv(f"{name}.skip", res, cin, cout, 1))
    return out


def _attention(name: str, res: int, c: int) -> list[Layer]:
    n = res * res
    core = Layer(f"{name}.sdpa", "attention", 0, 4 * n * n * c, n * c, res, c, c)
    return [_norm(f"{name}.norm", res, c), _linear(f"{name}.qkv", n, c, 3 * c, res), core,
            _linear(f"{name}.out", n, c, c, res)]


def layers(cfg: UNetConfig) -> list[Layer]:
    """Every weight-bearing op of the U-Net for ``cfg``, in execution order, at batch 1."""
    out = [_linear("time_in", 1, cfg.base_width, cfg.time_emb_dim),
           _linear("time_out", 1, cfg.time_emb_dim, cfg.time_emb_dim),
           _conv("conv_in", cfg.image_size, cfg.channels, cfg.base_width, 3)]
    res, cin, skips = cfg.image_size, cfg.base_width, [cfg.base_width]
    last = len(cfg.widths) - 1
    for level, width in enumerate(cfg.widths):
        for b in range(cfg.num_res_blocks):
            out += _resblock(cfg, f"down{level}.{b}", res, cin, width)
            if level in cfg.attn_levels:
                out += _attention(f"down{level}.{b}.attn", res, width)
            cin = width
            skips.append(width)
        if level < last:
            res //= 2
            out.append(_conv(f"down{level}.downsample", res, width, width, 3))
            skips.append(width)
    out += _resblock(cfg, "mid1", res, cin, cin)
    if last in cfg.attn_levels:
        out += _attention("mid.attn", res, cin)
    out += _resblock(cfg, "mid2", res, cin, cin)
    for level in reversed(range(len(cfg.widths))):
        width = cfg.widths[level]
        for b in range(cfg.num_res_blocks + 1):
            out += _resblock(cfg, f"up{level}.{b}", res, cin + skips.pop(), width)
            if level in cfg.attn_levels:
                out += _attention(f"up{level}.{b}.attn", res, width)
            cin = width
        if level > 0:
            out.append(_upsample(cfg, f"up{level}.upsample", res, width))
            res *= 2
    out += [_norm("norm_out", res, cin), _conv("conv_out", res, cin, cfg.channels, 3)]
    return out


def _upsample(cfg: UNetConfig, name: str, res: int, c: int) -> Layer:
    if cfg.resample == "nearest":
        return _conv(name, 2 * res, c, c, 3)
    # A 4x4 stride-2 transposed conv scatters each input pixel into a 4x4 patch.
    return Layer(name, "convT", 16 * c * c + c, 2 * res * res * 16 * c * c, 4 * res * res * c,
                 2 * res, c, c)


def param_count(cfg: UNetConfig) -> int:
    """Number of trainable parameters of the U-Net for ``cfg``."""
    return sum(layer.params for layer in layers(cfg))


def flops(cfg: UNetConfig) -> int:
    """FLOPs of one forward pass at batch 1 (a multiply-add counts as 2)."""
    return sum(layer.flops for layer in layers(cfg))
