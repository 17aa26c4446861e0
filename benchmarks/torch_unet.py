"""PyTorch (NCHW) port of ``engine.model.unet.UNet``, for side-by-side benchmarks only.

This file must not import ``engine`` or ``mlx``: it runs in a separate interpreter
that has PyTorch but not the project's dependencies. :class:`UNetCfg` therefore
duplicates the fields of ``engine.config.UNetConfig`` and reads the same JSON (either
a bare ``UNetConfig`` object or a full ``Config`` with a ``"unet"`` section).

The module tree mirrors the MLX one name for name (``down.0.blocks.0.conv1.conv``,
``mid_attn.0.qkv``, ...), so :func:`load_mlx_weights` can copy MLX parameters across
by name, transposing only the convolution kernels (MLX: ``O,kH,kW,I``; torch
``Conv2d``: ``O,I,kH,kW``; torch ``ConvTranspose2d``: ``I,O,kH,kW``).

Parameter count: :func:`param_count` must equal ``engine.model.cost.param_count`` for the
same config; the harness (``benchmarks/throughput.py``) asserts it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetCfg:
    """The fields (and defaults) of ``engine.config.UNetConfig``; no validation here."""

    image_size: int = 16
    channels: int = 1
    base_width: int = 32
    width_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    head_dim: int = 32
    norm_groups: int = 8
    norm: str = "group"
    activation: str = "silu"
    dropout: float = 0.0
    resample: str = "nearest"
    separable: bool = False
    time_emb_dim: int = 128
    num_classes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "width_mults", tuple(int(m) for m in self.width_mults))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in self.width_mults)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetCfg:
        """From a ``UNetConfig`` dict, or a full ``Config`` dict (its ``unet`` section)."""
        if "unet" in data and isinstance(data["unet"], dict):
            data = data["unet"]
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"UNetConfig: unknown field {min(unknown)!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def load(cls, path: str | Path) -> UNetCfg:
        return cls.from_dict(json.loads(Path(path).read_text()))


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}  # gelu: exact (erf), as MLX


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 t``, (B,) -> (B, dim): [cos | sin], as in MLX."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(cfg: UNetCfg, width: int) -> nn.Module:
    groups = cfg.norm_groups if cfg.norm == "group" else 1
    return nn.GroupNorm(groups, width, eps=1e-5)


class Conv3x3(nn.Module):
    def __init__(self, cin: int, cout: int, separable: bool, stride: int = 1):
        super().__init__()
        self.separable = separable
        if separable:
            self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin)
            self.pointwise = nn.Conv2d(cin, cout, 1)
        else:
            self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.separable:
            return self.pointwise(self.depthwise(x))
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetCfg, cin: int, cout: int):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.activation]
        self.norm1 = _norm(cfg, cin)
        self.conv1 = Conv3x3(cin, cout, cfg.separable)
        self.temb = nn.Linear(cfg.time_emb_dim, cout)
        self.norm2 = _norm(cfg, cout)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.conv2 = Conv3x3(cout, cout, cfg.separable)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.act(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (token order h-major, as MLX)."""

    def __init__(self, cfg: UNetCfg, width: int):
        super().__init__()
        self.heads = width // cfg.head_dim
        self.norm = _norm(cfg, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, L, C)
        qkv = self.qkv(tokens)
        qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = 1.0 / math.sqrt(c // self.heads)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        o = o.transpose(1, 2).reshape(b, h * w, c)
        return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "nearest":
            self.conv = nn.Conv2d(width, width, 3, padding=1)
        else:
            self.conv = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nearest":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    def __init__(self, cfg: UNetCfg, cins: list[int], cout: int, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cfg, cin, cout) for cin in cins)
        self.attns = nn.ModuleList(Attention(cfg, cout) for _ in cins) if attention \
            else nn.ModuleList()


class UNet(nn.Module):
    """Same architecture as ``engine.model.unet.UNet``; call with x (B, C, H, W), t (B,)."""

    def __init__(self, cfg: UNetCfg):
        super().__init__()
        self.config = cfg
        self.act = _ACTIVATIONS[cfg.activation]
        self.time_in = nn.Linear(cfg.base_width, cfg.time_emb_dim)
        self.time_out = nn.Linear(cfg.time_emb_dim, cfg.time_emb_dim)
        self.conv_in = nn.Conv2d(cfg.channels, cfg.base_width, 3, padding=1)
        widths = cfg.widths
        skips = [cfg.base_width]
        self.down = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        cin = cfg.base_width
        for level, width in enumerate(widths):
            ins = [cin] + [width] * (cfg.num_res_blocks - 1)
            self.down.append(Level(cfg, ins, width, level in cfg.attn_levels))
            skips += [width] * cfg.num_res_blocks
            cin = width
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(width))
                skips.append(width)
        self.mid1 = ResBlock(cfg, cin, cin)
        self.mid_attn = nn.ModuleList(
            [Attention(cfg, cin)] if (len(widths) - 1) in cfg.attn_levels else [])
        self.mid2 = ResBlock(cfg, cin, cin)
        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            ins = []
            for _ in range(cfg.num_res_blocks + 1):
                ins.append(cin + skips.pop())
                cin = width
            self.up.append(Level(cfg, ins, width, level in cfg.attn_levels))
            if level > 0:
                self.upsamples.append(Upsample(width, cfg.resample))
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, cfg.channels, 3, padding=1)
        if cfg.num_classes > 0:  # index num_classes is the null label, as in MLX
            self.label_emb = nn.Embedding(cfg.num_classes + 1, cfg.time_emb_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        temb = timestep_embedding(t, self.config.base_width)
        temb = self.time_out(self.act(self.time_in(temb)))
        if self.config.num_classes > 0:
            if y is None:
                y = torch.full((x.shape[0],), self.config.num_classes, device=x.device)
            temb = temb + self.label_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            h = _run_level(level, h, temb, hs)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                hs.append(h)
        h = self.mid1(h, temb)
        for attn in self.mid_attn:
            h = attn(h)
        h = self.mid2(h, temb)
        for i, level in enumerate(self.up):
            h = _run_level(level, h, temb, None, skips=hs)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(self.act(self.norm_out(h)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _run_level(level: Level, h: torch.Tensor, temb: torch.Tensor, out: list | None,
               skips: list | None = None) -> torch.Tensor:
    for i, block in enumerate(level.blocks):
        if skips is not None:
            h = torch.cat([h, skips.pop()], dim=1)  # channel concat, [h | skip] as MLX
        h = block(h, temb)
        if len(level.attns):
            h = level.attns[i](h)
        if out is not None:
            out.append(h)
    return h


def param_count(cfg: UNetCfg) -> int:
    """Parameters of the torch model for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return UNet(cfg).num_params()


def load_mlx_weights(model: UNet, weights: dict[str, np.ndarray]) -> None:
    """Copy MLX parameters (flat names, MLX layouts) into ``model``; names must match 1:1."""
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    extra = sorted(set(weights) - set(state))
    if missing or extra:
        raise ValueError(f"parameter names differ: torch-only {missing[:5]}, "
                         f"mlx-only {extra[:5]}")
    modules = dict(model.named_modules())
    new = {}
    for name, value in weights.items():
        owner = modules[name.rsplit(".", 1)[0]]
        arr = np.asarray(value, dtype=np.float32)
        if name.endswith(".weight") and isinstance(owner, nn.ConvTranspose2d):
            # MLX conv_transpose (O, kH, kW, I) -> torch (I, O, kH, kW); same (unflipped)
            # kernel orientation, checked numerically by the harness.
            arr = arr.transpose(3, 0, 1, 2)
        elif name.endswith(".weight") and isinstance(owner, nn.Conv2d):
            arr = arr.transpose(0, 3, 1, 2)  # (O, kH, kW, I/g) -> (O, I/g, kH, kW)
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"{name}: mlx shape {tensor.shape} vs torch {state[name].shape}")
        new[name] = tensor
    model.load_state_dict(new)


if __name__ == "__main__":  # quick smoke test: python benchmarks/torch_unet.py [config.json]
    import sys

    cfg = UNetCfg.load(sys.argv[1]) if len(sys.argv) > 1 else UNetCfg()
    net = UNet(cfg)
    x = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    y = net(x, torch.tensor([0.1, 0.9]))
    assert y.shape == x.shape, (y.shape, x.shape)
    print(f"{cfg}: {net.num_params()} parameters, output {tuple(y.shape)}")
