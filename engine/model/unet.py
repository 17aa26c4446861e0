"""Noise-prediction U-Net in MLX (NHWC), built from a :class:`UNetConfig`.

The layout follows Ho et al. 2020 / Nichol & Dhariwal 2021: residual blocks with
additive time conditioning, optional self-attention per level, and skip connections
from every block of the encoder to the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import groupby
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from engine.config import UNetConfig
from engine.model.activation import silu, softmax
from engine.model.blocks import Block, walk
from engine.model.conv import Conv2d
from engine.model.formulation import cpu_layers
from engine.model.norm import GroupNorm

_ACTIVATIONS = {"silu": silu, "gelu": nn.gelu, "relu": nn.relu}


def embed(table: mx.array, y: mx.array) -> mx.array:
    """``table[y]``, the rows of integer labels ``y``, as a one-hot multiply and sum.

    The same values (one term of each sum is the row, the rest exact zeros; a one-hot matmul
    would round the rows to TF32, MLX's default for float32 GEMMs on CUDA), without the
    gather, and the scatter-add of its gradient, that MLX's CUDA backend compiles with
    NVRTC in every process that starts with an empty kernel cache (seconds each).
    """
    onehot = mx.expand_dims(y, -1) == mx.arange(table.shape[0])
    return (mx.expand_dims(onehot.astype(table.dtype), -1) * table).sum(axis=-2)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of continuous time ``t`` in [0, 1], shape (B,) -> (B, dim).

    Vaswani et al. 2017, applied to ``1000 t`` so that frequencies match discrete DDPM.
    """
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = (1000.0 * t)[:, None].astype(mx.float32) * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def _norm(cfg: UNetConfig, width: int) -> nn.Module:
    groups = cfg.norm_groups if cfg.norm == "group" else 1
    return GroupNorm(groups, width)


class Conv3x3(nn.Module):
    """A 3x3 conv, or depthwise 3x3 followed by pointwise 1x1 when ``separable``."""

    def __init__(self, cin: int, cout: int, separable: bool, stride: int = 1):
        super().__init__()
        self.separable = separable
        if separable:
            self.depthwise = Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin)
            self.pointwise = Conv2d(cin, cout, 1)
        else:
            self.conv = Conv2d(cin, cout, 3, stride=stride, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.separable:
            return self.pointwise(self.depthwise(x))
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, cin: int, cout: int):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.activation]
        self.norm1 = _norm(cfg, cin)
        self.conv1 = Conv3x3(cin, cout, cfg.separable)
        self.temb = nn.Linear(cfg.time_emb_dim, cout)
        self.norm2 = _norm(cfg, cout)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.conv2 = Conv3x3(cout, cout, cfg.separable)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else None

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb(temb)[:, None, None, :]
        h = self.act(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, cfg: UNetConfig, width: int):
        super().__init__()
        self.heads = width // cfg.head_dim
        self.norm = _norm(cfg, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
        # (B, L, 3C) -> 3 x (B, heads, L, head_dim)
        qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
        # A split, not qkv[0], qkv[1], qkv[2]: MLX indexes with an integer through a gather
        # (and differentiates it with a scatter), two kernels its CUDA backend compiles with
        # NVRTC in every fresh process: 5.1 of the 6.3 s of a cold first step on an H200.
        q, k, v = (a.squeeze(0) for a in mx.split(qkv, 3, axis=0))
        scale = 1.0 / math.sqrt(c // self.heads)
        if cpu_layers():
            # softmax(q k^T / sqrt(d)) v, spelled out: MLX's CPU attention kernel runs its
            # softmax on the one-element-at-a-time ``exp`` (most of this block's time).
            o = softmax((q * scale) @ k.swapaxes(-1, -2)) @ v
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        o = o.transpose(0, 2, 1, 3).reshape(b, h * w, c)
        return x + self.out(o).reshape(b, h, w, c)


class Downsample(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = Conv2d(width, width, 3, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsample + 3x3 conv, or a 4x4 stride-2 transposed conv."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "nearest":
            self.conv = Conv2d(width, width, 3, padding=1)
        else:
            self.conv = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "nearest":
            b, h, w, c = x.shape
            x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
            x = x.reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class Level(nn.Module):
    """The blocks of one resolution, with optional attention after each block."""

    def __init__(self, cfg: UNetConfig, blocks: list[Block], attns: list[Block]):
        super().__init__()
        self.blocks = [ResBlock(cfg, b.cin, b.cout) for b in blocks]
        self.attns = [Attention(cfg, b.cout) for b in attns]


class UNet(nn.Module):
    """U-Net mapping ``(x_t, t)`` to the configured prediction target.

    Its modules are the blocks of :func:`engine.model.blocks.walk`, each at its ``path``.

    Args:
        cfg: the architecture.

    Call with ``x`` of shape (B, H, W, C), ``t`` of shape (B,) in [0, 1] and, for a
    class-conditional network (``cfg.num_classes > 0``), optional labels ``y`` of shape (B,):
    integers in [0, num_classes], where ``num_classes`` is the null label that every call
    without ``y`` uses (the unconditional prediction).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.act = _ACTIVATIONS[cfg.activation]
        built = _build(cfg)
        self.time_in, self.time_out = built["time"]
        self.conv_in = built["conv_in"]
        self.down, self.downsamples = built["down"], built["downsamples"]
        self.mid1, self.mid_attn, self.mid2 = built["mid1"], built["mid_attn"], built["mid2"]
        self.up, self.upsamples = built["up"], built["upsamples"]
        self.norm_out, self.conv_out = built["out"]
        if cfg.num_classes > 0:  # made last: an unconditional net's initial weights stay the same
            self.label_emb = nn.Embedding(cfg.num_classes + 1, cfg.time_emb_dim)
        # Gradient checkpointing per ResBlock/Attention (set by engine.training.train, not a weight).
        self.checkpointing = False

    def __call__(self, x: mx.array, t: mx.array, y: mx.array | None = None) -> mx.array:
        # Compute in the dtype of the weights (bf16/fp16 casts; MLX has no autocast).
        dtype = self.norm_out.weight.dtype
        temb = timestep_embedding(t, self.config.base_width).astype(dtype)
        temb = self.time_out(self.act(self.time_in(temb)))
        if self.config.num_classes > 0:
            if y is None:
                y = mx.full((x.shape[0],), self.config.num_classes, dtype=mx.int32)
            temb = temb + embed(self.label_emb.weight, y).astype(dtype)
        h = self.conv_in(x.astype(dtype))
        hs = [h]
        run = _checkpointed if self.checkpointing else _direct
        for i, level in enumerate(self.down):
            h = _run_level(level, h, temb, hs, run=run)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                hs.append(h)
        h = run(self.mid1, h, temb)
        for attn in self.mid_attn:
            h = run(attn, h)
        h = run(self.mid2, h, temb)
        for i, level in enumerate(self.up):
            h = _run_level(level, h, temb, None, skips=hs, run=run)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(self.act(self.norm_out(h)))

    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))


def _build(cfg: UNetConfig) -> dict[str, Any]:
    """The modules of every block, by the first part of its path, created in walk order.

    The encoder and decoder levels are :class:`Level` s, which create all their ResBlocks
    before their attentions: the order of the random initial weights.
    """
    built: dict[str, Any] = {"down": [], "downsamples": [], "mid_attn": [], "up": [],
                             "upsamples": []}
    for key, blocks in groupby(walk(cfg), key=_level_of):
        group = list(blocks)
        if isinstance(key, tuple):
            built[key[0]].append(Level(cfg, [b for b in group if b.kind == "res"],
                                       [b for b in group if b.kind == "attn"]))
            continue
        head, module = key.split(".")[0], _module(cfg, group[0])
        if isinstance(built.get(head), list):
            built[head].append(module)
        else:
            built[head] = module
    return built


def _level_of(block: Block) -> tuple[str, int | None] | str:
    """Blocks of one :class:`Level` share a key; every other block has its own."""
    if block.stage in ("down", "up") and block.kind in ("res", "attn"):
        return block.stage, block.level
    return block.path


def _module(cfg: UNetConfig, block: Block) -> Any:
    """The module (or, for ``time`` and ``out``, the pair of modules) of one block."""
    if block.kind == "time":
        return (nn.Linear(block.cin, cfg.time_emb_dim),
                nn.Linear(cfg.time_emb_dim, block.cout))
    if block.kind == "conv_in":
        return Conv2d(block.cin, block.cout, 3, padding=1)
    if block.kind == "res":
        return ResBlock(cfg, block.cin, block.cout)
    if block.kind == "attn":
        return Attention(cfg, block.cout)
    if block.kind == "down":
        return Downsample(block.cout)
    if block.kind == "up":
        return Upsample(block.cout, cfg.resample)
    return _norm(cfg, block.cin), Conv2d(block.cin, block.cout, 3, padding=1)


def _direct(module: nn.Module, *args: mx.array) -> mx.array:
    return module(*args)


def _checkpointed(module: nn.Module, *args: mx.array) -> mx.array:
    """Keep only the block's inputs for backward and recompute its insides (Chen et al. 2016).

    A block with active dropout runs un-checkpointed: the recomputation would draw a new
    dropout mask, so backward would not match forward.
    """
    if getattr(module, "dropout", None) is not None and module.training:
        return module(*args)
    return nn.utils.checkpoint(module)(*args)


def _run_level(
    level: Level, h: mx.array, temb: mx.array, out: list[mx.array] | None,
    skips: list[mx.array] | None = None, run: Callable[..., mx.array] = _direct,
) -> mx.array:
    for i, block in enumerate(level.blocks):
        if skips is not None:
            h = mx.concatenate([h, skips.pop()], axis=-1)
        h = run(block, h, temb)
        if level.attns:
            h = run(level.attns[i], h)
        if out is not None:
            out.append(h)
    return h
