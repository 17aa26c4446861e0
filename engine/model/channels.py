"""Channel spaces and maps: how a morphism carries weights from one U-Net to another.

A morphism of :mod:`engine.model.morph` works on the channel *spaces* of
:func:`engine.model.blocks.walk` (a level's stream, a block's hidden layer, an
attention's heads). It is one :class:`ChannelMap` per space, ``new channel -> old
channel``, which :func:`remap` applies to every producer (rows) and every consumer
(columns, scaled by ``1 / copies`` so that duplicates sum back) of that space.

``params`` is a parameter tree as returned by ``UNet.parameters()`` (or a checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from engine.config import UNetConfig
from engine.model.blocks import Block, Space, walk

Flat = dict[str, np.ndarray]


@dataclass(frozen=True)
class ChannelMap:
    """``src[j]``: the old channel that new channel ``j`` copies (-1: none, reads as 0).

    ``scale[j]`` multiplies a consumer's weights that read new channel ``j``: ``1/copies``
    for duplicates, so a consumer of both copies computes the old sum exactly.
    """

    src: np.ndarray
    scale: np.ndarray


def identity(width: int) -> ChannelMap:
    """Every channel kept where it is."""
    return ChannelMap(np.arange(width), np.ones(width, np.float32))


def dup(width: int) -> ChannelMap:
    """Interleaved duplication: new channel ``j`` copies old ``j // 2``."""
    return ChannelMap(np.arange(2 * width) // 2, np.full(2 * width, 0.5, np.float32))


def dup_heads(width: int, head_dim: int) -> ChannelMap:
    """Whole heads duplicated: new head ``h`` copies old head ``h // 2`` (same head_dim)."""
    n = np.arange(2 * width)
    return ChannelMap((n // head_dim // 2) * head_dim + n % head_dim,
                      np.full(2 * width, 0.5, np.float32))


def dup_sinusoid(dim: int) -> ChannelMap:
    """Sinusoid of ``2 dim`` features: its even frequencies are exactly the old ones.

    ``freqs[k] = P^(-k / half)``; with ``half`` doubled, index ``2k`` is old index ``k``.
    The odd (new) frequencies get zero weight in ``time_in``.
    """
    half = dim // 2
    j = np.arange(2 * dim)
    k = j % (2 * half)
    src = np.where(k % 2 == 0, (j // (2 * half)) * half + k // 2, -1)
    return ChannelMap(src, (src >= 0).astype(np.float32))


def half_sinusoid(dim: int) -> ChannelMap:
    """Sinusoid of ``dim / 2`` features: exactly the old even frequencies (``dup_sinusoid``)."""
    half, quarter = dim // 2, dim // 4
    j = np.arange(dim // 2)
    src = (j // quarter) * half + 2 * (j % quarter)
    return ChannelMap(src, np.ones(len(src), np.float32))


def select(index: np.ndarray) -> ChannelMap:
    """The channels ``index`` kept, in their old order (pruning)."""
    index = np.sort(np.asarray(index))
    return ChannelMap(index, np.ones(len(index), np.float32))


def _heads_qkv(m: ChannelMap, old_width: int) -> ChannelMap:
    """The (3, heads, head_dim) output of ``qkv`` follows the heads map three times."""
    src = np.concatenate([np.where(m.src >= 0, m.src + s * old_width, -1) for s in range(3)])
    return ChannelMap(src, np.ones(len(src), np.float32))


def _take(a: np.ndarray, src: np.ndarray, axis: int) -> np.ndarray:
    out = np.take(a, np.maximum(src, 0), axis=axis)
    if (src < 0).any():
        shape = [1] * a.ndim
        shape[axis] = len(src)
        out = out * (src >= 0).reshape(shape)
    return out


class _Remap:
    """Copies weights from an old flat parameter dict into a new one, block by block."""

    def __init__(self, old: Flat, maps: dict[str, ChannelMap], exact: bool):
        self.old, self.maps, self.exact = old, maps, exact
        self.new: Flat = {}

    def space(self, part: Space) -> ChannelMap:
        return self.maps.get(part.name) or identity(part.width)

    def cat(self, parts: tuple[Space, ...]) -> ChannelMap:
        srcs, scales, offset = [], [], 0
        for part in parts:
            m = self.space(part)
            srcs.append(np.where(m.src >= 0, m.src + offset, -1))
            scales.append(m.scale)
            offset += part.width
        return ChannelMap(np.concatenate(srcs), np.concatenate(scales))

    def dense(self, name: str, i: ChannelMap, o: ChannelMap) -> None:
        """Linear (out, in) or conv (out, kh, kw, in): rows follow ``o``, columns ``i``."""
        w = _take(_take(self.old[f"{name}.weight"], o.src, 0), i.src, -1)
        self.new[f"{name}.weight"] = (w * i.scale).astype(np.float32)
        self.new[f"{name}.bias"] = _take(self.old[f"{name}.bias"], o.src, 0)

    def channelwise(self, name: str, m: ChannelMap) -> None:
        """Norm affine or depthwise conv: one parameter slice per channel, copied."""
        self.new[f"{name}.weight"] = _take(self.old[f"{name}.weight"], m.src, 0)
        self.new[f"{name}.bias"] = _take(self.old[f"{name}.bias"], m.src, 0)

    def conv3(self, name: str, i: ChannelMap, o: ChannelMap, separable: bool) -> None:
        if separable:
            self.channelwise(f"{name}.depthwise", i)
            self.dense(f"{name}.pointwise", i, o)
        else:
            self.dense(f"{name}.conv", i, o)

    def block(self, old: Block, new: Block, cfg: UNetConfig) -> None:
        p = new.path
        if new.kind == "time":
            hidden = self.maps.get("time.hidden") or identity(cfg.time_emb_dim)
            self.dense("time_in", self.cat(old.ins), hidden)
            self.dense("time_out", hidden, self.space(old.out))
        elif new.kind == "conv_in":
            self.dense("conv_in", self.cat(old.ins), self.space(old.out))
        elif new.kind in ("down", "up"):
            m = self.space(old.out)
            self.dense(f"{p}.conv", m, m)
        elif new.kind == "out":
            i = self.cat(old.ins)
            self.channelwise("norm_out", i)
            self.dense("conv_out", i, self.space(old.out))
        elif new.kind == "attn":
            self.attention(old, cfg)
        else:
            self.resblock(old, new, cfg)

    def attention(self, old: Block, cfg: UNetConfig) -> None:
        p, io = old.path, self.space(old.out)
        heads = self.maps.get(f"{p}.heads") or identity(old.cout)
        self.channelwise(f"{p}.norm", io)
        self.dense(f"{p}.qkv", io, _heads_qkv(heads, old.cout))
        self.dense(f"{p}.out", heads, io)

    def resblock(self, old: Block, new: Block, cfg: UNetConfig) -> None:
        p, i, o = new.path, self.cat(old.ins), self.space(old.out)
        h = self.maps.get(f"{p}.hidden") or identity(old.cout)
        self.channelwise(f"{p}.norm1", i)
        self.conv3(f"{p}.conv1", i, h, cfg.separable)
        self.dense(f"{p}.temb", identity(cfg.time_emb_dim), h)
        self.channelwise(f"{p}.norm2", h)
        self.conv3(f"{p}.conv2", h, o, cfg.separable)
        had, has = old.cin != old.cout, new.cin != new.cout
        if had and has:
            self.dense(f"{p}.skip", i, o)
        elif has:
            # The old residual added x channel by channel; project the new x onto it.
            w = (i.src[None, :] == o.src[:, None]) * i.scale[None, :]
            self.new[f"{p}.skip.weight"] = w[:, None, None, :].astype(np.float32)
            self.new[f"{p}.skip.bias"] = np.zeros(len(o.src), np.float32)
        elif had and self.exact:
            raise ValueError(f"{p}: input and output widths become equal ({new.cin}), so the "
                             "block loses its 1x1 residual projection; the morphism cannot "
                             "preserve the function")
        elif not had and not has:
            assert np.array_equal(i.src, o.src), f"{p}: identity residual across different maps"


def items(tree: Any) -> dict[str, Any]:
    """``tree_flatten`` as a dict (its declared return type is a union of list and dict)."""
    return dict(tree_flatten(tree, destination={}))


def to_flat(params: dict) -> Flat:
    """A parameter tree as ``{dotted path: numpy array}``."""
    return {k: np.array(v) for k, v in items(params).items()}


def to_tree(flat: Flat) -> dict:
    """The inverse of :func:`to_flat`, as MLX arrays."""
    return tree_unflatten([(k, mx.array(v)) for k, v in sorted(flat.items())])


def remap(old_cfg: UNetConfig, new_cfg: UNetConfig, params: dict, maps: dict[str, ChannelMap],
          exact: bool) -> dict:
    """Carry ``params`` of ``old_cfg`` over to ``new_cfg``, whose blocks have the same paths.

    Args:
        old_cfg: the architecture of ``params``.
        new_cfg: the architecture to map to.
        params: a parameter tree of ``old_cfg``.
        maps: the map of each space that changes (by space name); the others are identities.
        exact: refuse a block whose 1x1 residual projection would vanish.

    Returns:
        The parameter tree of ``new_cfg``.

    Raises:
        ValueError: ``exact`` and a block's input and output widths become equal.
    """
    old_blocks = {b.path: b for b in walk(old_cfg)}
    mover = _Remap(to_flat(params), maps, exact)
    for new in walk(new_cfg):
        mover.block(old_blocks[new.path], new, new_cfg)
    return to_tree(mover.new)


def level_spaces(cfg: UNetConfig, level: int | None) -> Iterator[tuple[str, str, int]]:
    """``(space, role, old width)`` of every space that belongs to ``level`` (None: all)."""
    if level is None:
        yield "in", "stream", cfg.base_width
    for lv, width in enumerate(cfg.widths):
        if level in (None, lv):
            yield f"L{lv}", "stream", width
    for b in walk(cfg):
        if b.level is not None and level in (None, b.level):
            role = "hidden" if b.kind == "res" else "heads" if b.kind == "attn" else None
            if role:
                yield f"{b.path}.{role}", role, b.cout

