"""Architecture morphisms on ``(UNetConfig, params)``: widen, deepen, narrow, mutate, inherit.

Widening and deepening are function-preserving (Net2Net, Chen et al. 2016): the new
network computes the old function exactly, so training continues from the parent's
loss. Every op works on the channel *spaces* of the U-Net: a space is one channel
index set that several tensors share (a level's residual stream, a block's hidden
layer, an attention's heads). :func:`blocks` lists every weight-bearing block with the
spaces of its input (a concatenation of parts in the decoder) and of its output, by
an explicit walk that mirrors :class:`engine.model.unet.UNet`. A morphism is then one
:class:`_Map` per space, ``new channel -> old channel``, applied to every producer
(rows) and consumer (columns, scaled by ``1 / copies`` so that duplicates sum back).

Why only whole-network widening is exact: a decoder block normalises ``[h, skip]``
with GroupNorm, and ``h`` and ``skip`` come from two different levels. Doubling one
of them changes the group size on one side of the boundary only, so some groups mix
duplicated and single channels and their statistics change. ``widen(level=None)``
doubles every space (``base_width * 2``), keeps each new group a pair-wise copy of one
old group, and is exact; ``widen(level=l)`` is exact everywhere except those
boundary groups, and is offered as a close (not exact) start for a mutated child.

``params`` is a parameter tree as returned by ``UNet.parameters()`` (or a checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from engine.config import ACTIVATIONS, Config, UNetConfig
from engine.training.train import TrainState, init_state
from engine.model.unet import Attention, ResBlock, UNet

Flat = dict[str, np.ndarray]
Part = tuple[str, int]  # (space name, width)


@dataclass(frozen=True)
class Block:
    """One weight-bearing block of the U-Net, as :class:`engine.model.unet.UNet` builds it.

    ``path`` is its prefix in the parameter tree (``time`` stands for ``time_in`` and
    ``time_out``, ``out`` for ``norm_out`` and ``conv_out``); ``res`` is the spatial size
    of its input; ``ins`` the concatenated parts of its input and ``out`` its output.
    """

    path: str
    kind: str  # time | conv_in | res | attn | down | up | out
    res: int
    ins: tuple[Part, ...]
    out: Part

    @property
    def cin(self) -> int:
        return sum(w for _, w in self.ins)

    @property
    def level(self) -> int | None:
        """The level whose residual space this block writes, if any."""
        name = self.out[0]
        return int(name[1:]) if name.startswith("L") else None


def blocks(cfg: UNetConfig) -> list[Block]:
    """Every block of the U-Net for ``cfg`` in execution order, with channel spaces."""
    return list(_walk(cfg))


def _walk(cfg: UNetConfig) -> Iterator[Block]:
    widths, last, size = cfg.widths, len(cfg.widths) - 1, cfg.image_size
    yield Block("time", "time", 1, (("sin", cfg.base_width),), ("temb", cfg.time_emb_dim))
    cur: Part = ("in", cfg.base_width)
    yield Block("conv_in", "conv_in", size, (("img", cfg.channels),), cur)
    res, skips = size, [cur]
    for level, width in enumerate(widths):
        space: Part = (f"L{level}", width)
        for b in range(cfg.num_res_blocks):
            yield Block(f"down.{level}.blocks.{b}", "res", res, (cur,), space)
            if level in cfg.attn_levels:
                yield Block(f"down.{level}.attns.{b}", "attn", res, (space,), space)
            cur = space
            skips.append(space)
        if level < last:
            yield Block(f"downsamples.{level}", "down", res, (space,), space)
            res //= 2
            skips.append(space)
    yield Block("mid1", "res", res, (cur,), cur)
    if last in cfg.attn_levels:
        yield Block("mid_attn.0", "attn", res, (cur,), cur)
    yield Block("mid2", "res", res, (cur,), cur)
    for i, level in enumerate(reversed(range(len(widths)))):
        space = (f"L{level}", widths[level])
        for b in range(cfg.num_res_blocks + 1):
            yield Block(f"up.{i}.blocks.{b}", "res", res, (cur, skips.pop()), space)
            if level in cfg.attn_levels:
                yield Block(f"up.{i}.attns.{b}", "attn", res, (space,), space)
            cur = space
        if level > 0:
            yield Block(f"upsamples.{i}", "up", res, (space,), space)
            res *= 2
    yield Block("out", "out", res, (cur,), ("img", cfg.channels))


# --------------------------------------------------------------------------- channel maps


@dataclass(frozen=True)
class _Map:
    """``src[j]``: the old channel that new channel ``j`` copies (-1: none, reads as 0).

    ``scale[j]`` multiplies a consumer's weights that read new channel ``j``: ``1/copies``
    for duplicates, so a consumer of both copies computes the old sum exactly.
    """

    src: np.ndarray
    scale: np.ndarray


def _identity(width: int) -> _Map:
    return _Map(np.arange(width), np.ones(width, np.float32))


def _dup(width: int) -> _Map:
    """Interleaved duplication: new channel ``j`` copies old ``j // 2``."""
    return _Map(np.arange(2 * width) // 2, np.full(2 * width, 0.5, np.float32))


def _dup_heads(width: int, head_dim: int) -> _Map:
    """Whole heads duplicated: new head ``h`` copies old head ``h // 2`` (same head_dim)."""
    n = np.arange(2 * width)
    return _Map((n // head_dim // 2) * head_dim + n % head_dim,
                np.full(2 * width, 0.5, np.float32))


def _dup_sinusoid(dim: int) -> _Map:
    """Sinusoid of ``2 dim`` features: its even frequencies are exactly the old ones.

    ``freqs[k] = P^(-k / half)``; with ``half`` doubled, index ``2k`` is old index ``k``.
    The odd (new) frequencies get zero weight in ``time_in``.
    """
    half = dim // 2
    j = np.arange(2 * dim)
    k = j % (2 * half)
    src = np.where(k % 2 == 0, (j // (2 * half)) * half + k // 2, -1)
    return _Map(src, (src >= 0).astype(np.float32))


def _half_sinusoid(dim: int) -> _Map:
    """Sinusoid of ``dim / 2`` features: exactly the old even frequencies (``_dup_sinusoid``)."""
    half, quarter = dim // 2, dim // 4
    j = np.arange(dim // 2)
    src = (j // quarter) * half + 2 * (j % quarter)
    return _Map(src, np.ones(len(src), np.float32))


def _select(index: np.ndarray) -> _Map:
    index = np.sort(np.asarray(index))
    return _Map(index, np.ones(len(index), np.float32))


def _heads_qkv(m: _Map, old_width: int) -> _Map:
    """The (3, heads, head_dim) output of ``qkv`` follows the heads map three times."""
    src = np.concatenate([np.where(m.src >= 0, m.src + s * old_width, -1) for s in range(3)])
    return _Map(src, np.ones(len(src), np.float32))


def _take(a: np.ndarray, src: np.ndarray, axis: int) -> np.ndarray:
    out = np.take(a, np.maximum(src, 0), axis=axis)
    if (src < 0).any():
        shape = [1] * a.ndim
        shape[axis] = len(src)
        out = out * (src >= 0).reshape(shape)
    return out


class _Remap:
    """Copies weights from an old flat parameter dict into a new one, block by block."""

    def __init__(self, old: Flat, maps: dict[str, _Map], exact: bool):
        self.old, self.maps, self.exact = old, maps, exact
        self.new: Flat = {}

    def space(self, part: Part) -> _Map:
        return self.maps.get(part[0]) or _identity(part[1])

    def cat(self, parts: tuple[Part, ...]) -> _Map:
        srcs, scales, offset = [], [], 0
        for part in parts:
            m = self.space(part)
            srcs.append(np.where(m.src >= 0, m.src + offset, -1))
            scales.append(m.scale)
            offset += part[1]
        return _Map(np.concatenate(srcs), np.concatenate(scales))

    def dense(self, name: str, i: _Map, o: _Map) -> None:
        """Linear (out, in) or conv (out, kh, kw, in): rows follow ``o``, columns ``i``."""
        w = _take(_take(self.old[f"{name}.weight"], o.src, 0), i.src, -1)
        self.new[f"{name}.weight"] = (w * i.scale).astype(np.float32)
        self.new[f"{name}.bias"] = _take(self.old[f"{name}.bias"], o.src, 0)

    def channelwise(self, name: str, m: _Map) -> None:
        """Norm affine or depthwise conv: one parameter slice per channel, copied."""
        self.new[f"{name}.weight"] = _take(self.old[f"{name}.weight"], m.src, 0)
        self.new[f"{name}.bias"] = _take(self.old[f"{name}.bias"], m.src, 0)

    def conv3(self, name: str, i: _Map, o: _Map, separable: bool) -> None:
        if separable:
            self.channelwise(f"{name}.depthwise", i)
            self.dense(f"{name}.pointwise", i, o)
        else:
            self.dense(f"{name}.conv", i, o)

    def block(self, old: Block, new: Block, cfg: UNetConfig) -> None:
        p = new.path
        if new.kind == "time":
            hidden = self.maps.get("time.hidden") or _identity(cfg.time_emb_dim)
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
        heads = self.maps.get(f"{p}.heads") or _identity(old.out[1])
        self.channelwise(f"{p}.norm", io)
        self.dense(f"{p}.qkv", io, _heads_qkv(heads, old.out[1]))
        self.dense(f"{p}.out", heads, io)

    def resblock(self, old: Block, new: Block, cfg: UNetConfig) -> None:
        p, i, o = new.path, self.cat(old.ins), self.space(old.out)
        h = self.maps.get(f"{p}.hidden") or _identity(old.out[1])
        self.channelwise(f"{p}.norm1", i)
        self.conv3(f"{p}.conv1", i, h, cfg.separable)
        self.dense(f"{p}.temb", _identity(cfg.time_emb_dim), h)
        self.channelwise(f"{p}.norm2", h)
        self.conv3(f"{p}.conv2", h, o, cfg.separable)
        had, has = old.cin != old.out[1], new.cin != new.out[1]
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


def _items(tree: Any) -> dict[str, Any]:
    """``tree_flatten`` as a dict (its declared return type is a union of list and dict)."""
    return dict(tree_flatten(tree, destination={}))


def _flat(params: dict) -> Flat:
    return {k: np.array(v) for k, v in _items(params).items()}


def _tree(flat: Flat) -> dict:
    return tree_unflatten([(k, mx.array(v)) for k, v in sorted(flat.items())])


def _remap(old_cfg: UNetConfig, new_cfg: UNetConfig, params: dict, maps: dict[str, _Map],
           exact: bool) -> dict:
    old_blocks = {b.path: b for b in blocks(old_cfg)}
    remap = _Remap(_flat(params), maps, exact)
    for new in blocks(new_cfg):
        remap.block(old_blocks[new.path], new, new_cfg)
    return _tree(remap.new)


def _level_spaces(cfg: UNetConfig, level: int | None) -> Iterator[tuple[str, str, int]]:
    """``(space, role, old width)`` of every space that belongs to ``level`` (None: all)."""
    if level is None:
        yield "in", "stream", cfg.base_width
    for lv, width in enumerate(cfg.widths):
        if level in (None, lv):
            yield f"L{lv}", "stream", width
    for b in blocks(cfg):
        if b.level is not None and level in (None, b.level):
            role = "hidden" if b.kind == "res" else "heads" if b.kind == "attn" else None
            if role:
                yield f"{b.path}.{role}", role, b.out[1]


# --------------------------------------------------------------------------- morphisms


def widen(config: UNetConfig, params: dict, level: int | None = None
          ) -> tuple[UNetConfig, dict]:
    """Double the width of every level (``level=None``, exact) or of one level.

    Duplicated channels are interleaved (new ``j`` copies old ``j // 2``), so every new
    GroupNorm group holds both copies of one old group; attention duplicates whole heads
    at the same ``head_dim``. With ``level=None`` the output is unchanged up to float
    rounding. With a level, GroupNorms whose input joins that level with another (the
    decoder's ``[h, skip]``) see changed statistics: close, not exact (module docstring).

    Raises:
        ValueError: ``level`` out of range, or widening one level makes a block's input and
            output widths equal so its residual projection would vanish.
    """
    return _widen(config, params, level, strict=True)


def _widen(config: UNetConfig, params: dict, level: int | None, strict: bool
           ) -> tuple[UNetConfig, dict]:
    """:func:`widen`; ``strict=False`` drops a vanishing residual projection instead."""
    if level is None:
        new = replace(config, base_width=2 * config.base_width)
        maps = {"sin": _dup_sinusoid(config.base_width)}
    else:
        _check_level(config, level)
        mults = list(config.width_mults)
        mults[level] *= 2
        new = replace(config, width_mults=tuple(mults))
        maps = {}
    for name, role, width in _level_spaces(config, level):
        maps[name] = _dup_heads(width, config.head_dim) if role == "heads" else _dup(width)
    return new, _remap(config, new, params, maps, exact=strict)


def narrow(config: UNetConfig, params: dict, level: int | None = None, keep: int | None = None
           ) -> tuple[UNetConfig, dict]:
    """Prune ``level`` to ``keep`` channels (``level=None``: halve every level and
    ``base_width``), keeping the channels with the largest weight norms.

    Structured pruning (Li et al. 2017): stream channels are ranked by the normalised
    squared norms of the weights that write them, a block's hidden channels by those of
    its two convs, attention heads by their output projection. Not function-preserving;
    follow with a short recovery fine-tune (:func:`inherited_state` + ``engine.training.train``).

    Raises:
        ValueError: ``keep`` is not a smaller multiple of ``base_width`` that the norm groups
            (and the head dim, at an attention level) divide, or the halved widths are not.
    """
    if level is None:
        if config.base_width % 4:
            raise ValueError(f"narrow: base_width={config.base_width} must be a multiple of 4")
        new = replace(config, base_width=config.base_width // 2)
        maps = {"sin": _half_sinusoid(config.base_width)}
    else:
        _check_level(config, level)
        width = config.widths[level]
        if keep is None or not 0 < keep < width or keep % config.base_width:
            raise ValueError(f"narrow: keep={keep} must be a multiple of base_width="
                             f"{config.base_width} below the level width {width}")
        mults = list(config.width_mults)
        mults[level] = keep // config.base_width
        new = replace(config, width_mults=tuple(mults))  # validates norm_groups, head_dim
        maps = {}
    flat = _flat(params)
    tied = _tied_streams(config)
    for name, role, width in _level_spaces(config, level):
        n = width // 2 if keep is None else keep
        score = sum(_importance(config, flat, s, role) for s in tied.get(name, [name]))
        if role == "heads":
            heads = np.sort(np.argsort(-score, kind="stable")[: int(n) // config.head_dim])
            maps[name] = _select((heads[:, None] * config.head_dim
                                  + np.arange(config.head_dim)).ravel())
        else:
            maps[name] = _select(np.argsort(-score, kind="stable")[:n])
    return new, _remap(config, new, params, maps, exact=False)


def _tied_streams(cfg: UNetConfig) -> dict[str, list[str]]:
    """Streams that a block adds channel by channel (no 1x1 projection) share one index
    set: pruning must keep the same channels in all of them."""
    group: dict[str, list[str]] = {}
    for b in blocks(cfg):
        (src, width), = b.ins if len(b.ins) == 1 else (("", 0),)
        if b.kind == "res" and width == b.out[1] and src != b.out[0]:
            members = group.get(src, [src]) + group.get(b.out[0], [b.out[0]])
            for m in members:
                group[m] = members
    return group


def _rows(w: np.ndarray) -> np.ndarray:
    """Squared norm per output channel, normalised to mean 1 (weights differ in scale)."""
    r = (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)
    return r / max(float(r.mean()), 1e-12)


def _cols(w: np.ndarray) -> np.ndarray:
    return _rows(np.moveaxis(w, -1, 0))


def _importance(cfg: UNetConfig, flat: Flat, space: str, role: str) -> np.ndarray:
    conv = "pointwise" if cfg.separable else "conv"
    if role == "hidden":
        p = space[: -len(".hidden")]
        return _rows(flat[f"{p}.conv1.{conv}.weight"]) + _cols(flat[f"{p}.conv2.{conv}.weight"])
    if role == "heads":
        out = _cols(flat[f"{space[: -len('.heads')]}.out.weight"])
        return out.reshape(-1, cfg.head_dim).sum(axis=1)
    score = np.zeros(0)
    for b in blocks(cfg):
        if b.out[0] != space:
            continue
        name = {"res": f"{b.path}.conv2.{conv}", "attn": f"{b.path}.out",
                "conv_in": "conv_in"}.get(b.kind, f"{b.path}.conv")
        rows = _rows(flat[f"{name}.weight"])
        score = score + rows if score.size else rows
    return score


def deepen(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Add one identity-initialised residual block at every level (``num_res_blocks + 1``).

    ``num_res_blocks`` is global, so every level grows. The encoder gets a block at the end
    of each level: its last conv is zero, so it returns its input, and the extra skip it
    pushes equals the one before it. The decoder gets a block at position 1 that reads
    ``[h, that extra skip]``: its last conv is zero and its 1x1 projection is ``[I | 0]``,
    so it returns ``h`` and ignores the skip. New attention layers have a zero output
    projection. The new blocks' other weights are fresh (drawn from MLX's global PRNG).
    """
    new = replace(config, num_res_blocks=config.num_res_blocks + 1)
    tree = tree_unflatten(list(_flat(params).items()))
    n_levels = len(config.widths)
    for i, level in enumerate(reversed(range(n_levels))):
        width, attn = config.widths[level], level in config.attn_levels
        down, up = tree["down"][level], tree["up"][i]
        down["blocks"].append(_identity_block(new, width, width))
        up["blocks"].insert(1, _identity_block(new, 2 * width, width))
        if attn:
            down["attns"].append(_identity_attention(new, width))
            up["attns"].insert(1, _identity_attention(new, width))
    return new, _tree(_items(tree))


def _fresh(module) -> dict:
    mx.eval(module.parameters())
    return _flat(module.parameters())


def _identity_block(cfg: UNetConfig, cin: int, cout: int) -> dict:
    flat = _fresh(ResBlock(cfg, cin, cout))
    last = "conv2.pointwise" if cfg.separable else "conv2.conv"
    flat[f"{last}.weight"][:] = 0.0
    flat[f"{last}.bias"][:] = 0.0
    if cin != cout:  # [h, skip] -> h
        w = np.zeros((cout, 1, 1, cin), np.float32)
        w[np.arange(cout), 0, 0, np.arange(cout)] = 1.0
        flat["skip.weight"], flat["skip.bias"] = w, np.zeros(cout, np.float32)
    return tree_unflatten(list(flat.items()))


def _identity_attention(cfg: UNetConfig, width: int) -> dict:
    flat = _fresh(Attention(cfg, width))
    flat["out.weight"][:] = 0.0
    flat["out.bias"][:] = 0.0
    return tree_unflatten(list(flat.items()))


def add_attention(config: UNetConfig, params: dict, level: int) -> tuple[UNetConfig, dict]:
    """Add self-attention at ``level`` with a zero output projection (exact: ``x + 0``)."""
    _check_level(config, level)
    new = replace(config, attn_levels=tuple(sorted(set(config.attn_levels) | {level})))
    flat = _flat(params)
    for b in blocks(new):
        if b.kind == "attn" and b.level == level:
            att = _identity_attention(new, b.out[1])
            flat.update({f"{b.path}.{k}": v for k, v in _items(att).items()})
    return new, _tree(flat)


def _check_level(config: UNetConfig, level: int) -> None:
    if not 0 <= level < len(config.widths):
        raise ValueError(f"level={level}: must be in [0, {len(config.widths) - 1}]")


# --------------------------------------------------------------------------- exact folds


def densify(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Separable convs to dense ones, exactly: ``W[o,:,:,i] = pw[o,i] dw[i,:,:]``."""
    if not config.separable:
        return config, params
    flat = _flat(params)
    for dw_key in [k for k in flat if k.endswith(".depthwise.weight")]:
        p = dw_key[: -len(".depthwise.weight")]
        dw, dwb = flat.pop(dw_key), flat.pop(f"{p}.depthwise.bias")  # (C,3,3,1), (C,)
        pw, pwb = flat.pop(f"{p}.pointwise.weight"), flat.pop(f"{p}.pointwise.bias")
        pw = pw[:, 0, 0, :]  # (O, C)
        flat[f"{p}.conv.weight"] = np.einsum("oc,chw->ohwc", pw, dw[..., 0]).astype(np.float32)
        flat[f"{p}.conv.bias"] = (pwb + pw @ dwb).astype(np.float32)
    return replace(config, separable=False), _tree(flat)


# Transposed tap k (4x4, stride 2, padding 1) collects conv taps a of nearest-upsample +
# 3x3 conv: out[2y] = c0 x[y-1] + (c1+c2) x[y], out[2y+1] = (c0+c1) x[y] + c2 x[y+1].
_NEAREST_TO_T = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)


def to_transposed(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Nearest-upsample + 3x3 conv as the equal 4x4 stride-2 transposed conv (exact)."""
    if config.resample == "transposed":
        return config, params
    flat = _flat(params)
    for key in [k for k in flat if k.startswith("upsamples.") and k.endswith(".weight")]:
        a = _NEAREST_TO_T
        flat[key] = np.einsum("ka,oabi,lb->okli", a, flat[key], a).astype(np.float32)
    return replace(config, resample="transposed"), _tree(flat)


# --------------------------------------------------------------------------- search hooks

_FREE_FIELDS = ("activation", "dropout", "norm", "norm_groups", "image_size")
"""Fields that leave the parameter tree unchanged (the weights carry over as they are)."""


def mutate(config: UNetConfig, rng: np.random.Generator | int, quantum: int = 16,
           max_width: int = 512, max_blocks: int = 4) -> UNetConfig:
    """One random valid mutation of ``config`` (always a different, valid config).

    Drawn uniformly from :func:`neighbours` (the arguments are the same).
    """
    rng = np.random.default_rng(rng)
    options = neighbours(config, quantum, max_width, max_blocks)
    if not options:
        raise ValueError(f"mutate: no valid mutation of {config}")
    return options[int(rng.integers(len(options)))]


def neighbours(config: UNetConfig, quantum: int = 16, max_width: int = 512,
               max_blocks: int = 4) -> list[UNetConfig]:
    """Every valid config one mutation away from ``config``.

    Proposals: one level's width x2 or /2, all widths x2 or /2 (``base_width``), depth +-1,
    attention on or off at a level (where ``head_dim`` divides its width), another
    activation, the other resampling, separable on/off, the other norm. Widths stay
    multiples of ``quantum`` and at most ``max_width`` (a width that does not change is left
    alone); invalid proposals are skipped.
    """
    before = config.widths + (config.base_width,)
    return [c for c in _proposals(config, max_blocks) if c != config and
            all(w == old or (w % quantum == 0 and w <= max_width)
                for w, old in zip(c.widths + (c.base_width,), before))]


def _proposals(c: UNetConfig, max_blocks: int) -> Iterator[UNetConfig]:
    changes: list[dict] = [{"base_width": c.base_width * 2}]
    if c.base_width % 2 == 0:
        changes.append({"base_width": c.base_width // 2})
    for level, m in enumerate(c.width_mults):
        for new_m in (m * 2, m // 2 if m % 2 == 0 else 0):
            if new_m:
                changes.append({"width_mults": c.width_mults[:level] + (new_m,)
                                + c.width_mults[level + 1:]})
        toggled = tuple(sorted(set(c.attn_levels) ^ {level}))
        changes.append({"attn_levels": toggled})
    if c.num_res_blocks < max_blocks:
        changes.append({"num_res_blocks": c.num_res_blocks + 1})
    if c.num_res_blocks > 1:
        changes.append({"num_res_blocks": c.num_res_blocks - 1})
    changes += [{"activation": a} for a in ACTIVATIONS if a != c.activation]
    changes.append({"resample": "transposed" if c.resample == "nearest" else "nearest"})
    changes.append({"separable": not c.separable})
    changes.append({"norm": "layer" if c.norm == "group" else "group"})
    for change in changes:
        try:
            yield replace(c, **change)
        except ValueError:
            continue


def inherit(parent_config: UNetConfig, parent_params: dict, child_config: UNetConfig
            ) -> dict | None:
    """Weights for ``child_config`` derived from a parent, or None when not reachable.

    The child is reached by a chain of morphisms, one per difference:

    - exact: ``base_width`` x2^k (:func:`widen`), depth +k (:func:`deepen`), attention
      added (:func:`add_attention`), separable -> dense (:func:`densify`), nearest ->
      transposed (:func:`to_transposed`);
    - close: one level x2^k (``widen(level)``; a residual projection that would vanish is
      dropped);
    - a pruned start: narrower levels or ``base_width`` / 2^k (:func:`narrow`), fewer
      blocks, attention removed;
    - the same weights: ``activation``, ``dropout``, ``norm``, ``norm_groups``,
      ``image_size``.

    Anything else (``channels``, ``time_emb_dim``, ``head_dim`` with attention, the number
    of levels, dense -> separable, transposed -> nearest, width ratios that are not powers
    of two) returns None.
    """
    p, c = parent_config, child_config
    if (p.channels, p.time_emb_dim) != (c.channels, c.time_emb_dim):
        return None
    if p.head_dim != c.head_dim and (p.attn_levels or c.attn_levels):
        return None
    if len(p.width_mults) != len(c.width_mults):
        return None
    if c.separable and not p.separable:
        return None
    if p.resample == "transposed" and c.resample == "nearest":
        return None
    try:
        cfg, params = _inherit_steps(p, parent_params, c)
    except (ValueError, _Unreachable):
        return None
    if cfg != c:
        return None
    return params


def reachable(parent_config: UNetConfig, child_config: UNetConfig) -> bool:
    """Whether :func:`inherit` finds a chain of morphisms from the parent to the child.

    The answer depends on the two configs only; it is found by running the chain on a
    parent built afresh (no trained weights needed).
    """
    if parent_config == child_config:
        return True
    model = UNet(parent_config)
    return inherit(parent_config, model.parameters(), child_config) is not None


class _Unreachable(Exception):
    pass


def _inherit_steps(cfg: UNetConfig, params: dict, child: UNetConfig) -> tuple[UNetConfig, dict]:
    if cfg.separable and not child.separable:
        cfg, params = densify(cfg, params)
    if cfg.resample != child.resample:
        cfg, params = to_transposed(cfg, params)
    free = {f: getattr(child, f) for f in _FREE_FIELDS}
    cfg = replace(cfg, head_dim=child.head_dim) if not cfg.attn_levels else cfg
    for level in sorted(set(cfg.attn_levels) - set(child.attn_levels)):
        cfg, params = _drop_attention(cfg, params, level)
    while cfg.num_res_blocks < child.num_res_blocks:
        cfg, params = deepen(cfg, params)
    while cfg.num_res_blocks > child.num_res_blocks:
        cfg, params = _shallow(cfg, params)
    while cfg.base_width < child.base_width:
        cfg, params = widen(cfg, params)
    while cfg.base_width > child.base_width:
        cfg, params = narrow(cfg, params)
    if cfg.base_width != child.base_width:
        raise _Unreachable
    for level, (have, want) in enumerate(zip(cfg.widths, child.widths)):
        while have < want:
            cfg, params = _widen(cfg, params, level, strict=False)
            have = cfg.widths[level]
        if have > want:
            cfg, params = narrow(cfg, params, level, want)
    for level in sorted(set(child.attn_levels) - set(cfg.attn_levels)):
        cfg, params = add_attention(replace(cfg, head_dim=child.head_dim), params, level)
    return replace(cfg, **free), params


def _drop_attention(config: UNetConfig, params: dict, level: int) -> tuple[UNetConfig, dict]:
    new = replace(config, attn_levels=tuple(a for a in config.attn_levels if a != level))
    keep = {b.path for b in blocks(new)}
    flat = {k: v for k, v in _flat(params).items()
            if not _is_attention_key(k) or _block_path(k) in keep}
    return new, _tree(flat)


def _is_attention_key(key: str) -> bool:
    return ".attns." in key or key.startswith("mid_attn.")


def _block_path(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2] if parts[0] == "mid_attn" else parts[:4])


def _shallow(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Drop the block that :func:`deepen` would add (the inverse; not function-preserving)."""
    new = replace(config, num_res_blocks=config.num_res_blocks - 1)
    tree = tree_unflatten(list(_flat(params).items()))
    last = config.num_res_blocks - 1
    for i, level in enumerate(reversed(range(len(config.widths)))):
        down, up = tree["down"][level], tree["up"][i]
        for key in ("blocks", "attns"):
            if down.get(key):
                down[key].pop(last)
            if up.get(key):
                up[key].pop(1)
    # Each remaining decoder block reads the same widths as before: shapes carry over.
    return new, _tree(_items(tree))


def inherited_state(config: Config, params: dict) -> TrainState:
    """A fresh :class:`engine.training.train.TrainState` whose weights and EMA weights are ``params``.

    The optimizer starts fresh; train it with ``engine.training.train.train`` as usual.
    """
    state = init_state(config)
    state.model.update(params)
    state.ema = tree_unflatten([(k, mx.array(v)) for k, v in _items(params).items()])
    mx.eval(state.model.parameters(), state.ema)
    return state
