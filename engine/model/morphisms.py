"""Architecture morphisms on ``(UNetConfig, params)``: widen, narrow, deepen, add attention, fold.

Widening and deepening are function-preserving (Net2Net, Chen et al. 2016): the new
network computes the old function exactly, so training continues from the parent's
loss. Widening and narrowing are channel maps on the spaces of
:func:`engine.model.blocks.walk` (:mod:`engine.model.channels`); deepening and adding or
dropping attention move whole blocks of the walk and initialise the new ones as identities.

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

from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.nn import Module

from engine.config import UNetConfig
from engine.model.blocks import Block, walk
from engine.model.channels import (
    Flat,
    dup,
    dup_heads,
    dup_sinusoid,
    half_sinusoid,
    level_spaces,
    remap,
    select,
    to_flat,
    to_tree,
)
from engine.model.unet import Attention, ResBlock


def widen(config: UNetConfig, params: dict, level: int | None = None, *, strict: bool = True
          ) -> tuple[UNetConfig, dict]:
    """Double the width of every level (``level=None``, exact) or of one level.

    Duplicated channels are interleaved (new ``j`` copies old ``j // 2``), so every new
    GroupNorm group holds both copies of one old group; attention duplicates whole heads
    at the same ``head_dim``. With ``level=None`` the output is unchanged up to float
    rounding. With a level, GroupNorms whose input joins that level with another (the
    decoder's ``[h, skip]``) see changed statistics: close, not exact (module docstring).
    ``strict=False`` drops a residual projection that would vanish instead of raising.

    Raises:
        ValueError: ``level`` out of range, or (``strict``) widening one level makes a
            block's input and output widths equal so its residual projection would vanish.
    """
    if level is None:
        new = replace(config, base_width=2 * config.base_width)
        maps = {"sin": dup_sinusoid(config.base_width)}
    else:
        _check_level(config, level)
        mults = list(config.width_mults)
        mults[level] *= 2
        new = replace(config, width_mults=tuple(mults))
        maps = {}
    for name, role, width in level_spaces(config, level):
        maps[name] = dup_heads(width, config.head_dim) if role == "heads" else dup(width)
    return new, remap(config, new, params, maps, exact=strict)


def narrow(config: UNetConfig, params: dict, level: int | None = None, keep: int | None = None
           ) -> tuple[UNetConfig, dict]:
    """Prune ``level`` to ``keep`` channels (``level=None``: halve every level and
    ``base_width``), keeping the channels with the largest weight norms.

    Structured pruning (Li et al. 2017): stream channels are ranked by the normalised
    squared norms of the weights that write them, a block's hidden channels by those of
    its two convs, attention heads by their output projection. Not function-preserving;
    follow with a short recovery fine-tune (:func:`engine.model.morph.inherited_state` and
    ``engine.training.train``).

    Raises:
        ValueError: ``keep`` is not a smaller multiple of ``base_width`` that the norm groups
            (and the head dim, at an attention level) divide, or the halved widths are not.
    """
    if level is None:
        if config.base_width % 4:
            raise ValueError(f"narrow: base_width={config.base_width} must be a multiple of 4")
        new = replace(config, base_width=config.base_width // 2)
        maps = {"sin": half_sinusoid(config.base_width)}
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
    flat = to_flat(params)
    tied = _tied_streams(config)
    for name, role, width in level_spaces(config, level):
        n = width // 2 if keep is None else keep
        score = sum(_importance(config, flat, s, role) for s in tied.get(name, [name]))
        if role == "heads":
            heads = np.sort(np.argsort(-score, kind="stable")[: int(n) // config.head_dim])
            maps[name] = select((heads[:, None] * config.head_dim
                                  + np.arange(config.head_dim)).ravel())
        else:
            maps[name] = select(np.argsort(-score, kind="stable")[:n])
    return new, remap(config, new, params, maps, exact=False)


def _tied_streams(cfg: UNetConfig) -> dict[str, list[str]]:
    """Streams that a block adds channel by channel (no 1x1 projection) share one index
    set: pruning must keep the same channels in all of them."""
    group: dict[str, list[str]] = {}
    for b in walk(cfg):
        (src, width), = b.ins if len(b.ins) == 1 else (("", 0),)
        if b.kind == "res" and width == b.cout and src != b.out.name:
            members = group.get(src, [src]) + group.get(b.out.name, [b.out.name])
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
    for b in walk(cfg):
        if b.out.name != space:
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
    n = config.num_res_blocks
    new = replace(config, num_res_blocks=n + 1)
    added = [b for b in walk(new) if _in_level(b) and b.index == (n if b.stage == "down" else 1)]
    # Fresh weights are drawn deepest level first: encoder block, decoder block, their attentions.
    added.sort(key=lambda b: (-(b.level or 0), b.kind == "attn", b.stage == "up"))
    fresh = {b.path: _identity(new, b) for b in added}
    return new, _moved(config, new, params, _after_deepen, fresh)


def _after_deepen(b: Block) -> int:
    return b.index - (_in_level(b) and b.stage == "up" and b.index > 1)


def shallow(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Drop the blocks that :func:`deepen` would add (its inverse; not function-preserving).

    Each remaining decoder block reads the same widths as before, so every shape carries over.
    """
    new = replace(config, num_res_blocks=config.num_res_blocks - 1)
    return new, _moved(config, new, params, _after_shallow, {})


def _after_shallow(b: Block) -> int:
    return b.index + (_in_level(b) and b.stage == "up" and b.index >= 1)


def add_attention(config: UNetConfig, params: dict, level: int) -> tuple[UNetConfig, dict]:
    """Add self-attention at ``level`` with a zero output projection (exact: ``x + 0``)."""
    _check_level(config, level)
    new = replace(config, attn_levels=tuple(sorted(set(config.attn_levels) | {level})))
    fresh = {b.path: _identity(new, b) for b in walk(new) if b.kind == "attn" and b.level == level}
    return new, _moved(config, new, params, _same, fresh)


def drop_attention(config: UNetConfig, params: dict, level: int) -> tuple[UNetConfig, dict]:
    """Remove the self-attention at ``level`` (not function-preserving)."""
    new = replace(config, attn_levels=tuple(a for a in config.attn_levels if a != level))
    return new, _moved(config, new, params, _same, {})


def _same(b: Block) -> int:
    return b.index


def _in_level(b: Block) -> bool:
    """A ResBlock or attention of an encoder or decoder level (not the middle)."""
    return b.stage in ("down", "up") and b.kind in ("res", "attn")


def _moved(config: UNetConfig, new: UNetConfig, params: dict, index: Callable[[Block], int],
           fresh: dict[str, Flat]) -> dict:
    """The parameters of ``new``: each block's ``fresh`` weights, or else the weights of the
    block of ``config`` with the same stage, level and kind at position ``index(block)``."""
    old = to_flat(params)
    sources = {(b.stage, b.level, b.kind, b.index): b for b in walk(config)}
    out: Flat = {}
    for block in walk(new):
        if block.path in fresh:
            out.update({f"{block.path}.{k}": v for k, v in fresh[block.path].items()})
            continue
        source = sources[(block.stage, block.level, block.kind, index(block))]
        for src, dst in zip(source.prefixes, block.prefixes):
            out.update({dst + k[len(src):]: v for k, v in old.items() if k.startswith(f"{src}.")})
    return to_tree(out)


def _identity(cfg: UNetConfig, block: Block) -> Flat:
    """Fresh weights of a new ResBlock or attention that returns its input ``h``."""
    if block.kind == "attn":
        flat = _fresh(Attention(cfg, block.cout))
        flat["out.weight"][:] = 0.0
        flat["out.bias"][:] = 0.0
        return flat
    cin, cout = block.cin, block.cout
    flat = _fresh(ResBlock(cfg, cin, cout))
    last = "conv2.pointwise" if cfg.separable else "conv2.conv"
    flat[f"{last}.weight"][:] = 0.0
    flat[f"{last}.bias"][:] = 0.0
    if cin != cout:  # [h, skip] -> h
        w = np.zeros((cout, 1, 1, cin), np.float32)
        w[np.arange(cout), 0, 0, np.arange(cout)] = 1.0
        flat["skip.weight"], flat["skip.bias"] = w, np.zeros(cout, np.float32)
    return flat


def _fresh(module: Module) -> Flat:
    mx.eval(module.parameters())
    return to_flat(module.parameters())


def _check_level(config: UNetConfig, level: int) -> None:
    if not 0 <= level < len(config.widths):
        raise ValueError(f"level={level}: must be in [0, {len(config.widths) - 1}]")


# --------------------------------------------------------------------------- exact folds


def densify(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Separable convs to dense ones, exactly: ``W[o,:,:,i] = pw[o,i] dw[i,:,:]``."""
    if not config.separable:
        return config, params
    flat = to_flat(params)
    for dw_key in [k for k in flat if k.endswith(".depthwise.weight")]:
        p = dw_key[: -len(".depthwise.weight")]
        dw, dwb = flat.pop(dw_key), flat.pop(f"{p}.depthwise.bias")  # (C,3,3,1), (C,)
        pw, pwb = flat.pop(f"{p}.pointwise.weight"), flat.pop(f"{p}.pointwise.bias")
        pw = pw[:, 0, 0, :]  # (O, C)
        flat[f"{p}.conv.weight"] = np.einsum("oc,chw->ohwc", pw, dw[..., 0]).astype(np.float32)
        flat[f"{p}.conv.bias"] = (pwb + pw @ dwb).astype(np.float32)
    return replace(config, separable=False), to_tree(flat)


# Transposed tap k (4x4, stride 2, padding 1) collects conv taps a of nearest-upsample +
# 3x3 conv: out[2y] = c0 x[y-1] + (c1+c2) x[y], out[2y+1] = (c0+c1) x[y] + c2 x[y+1].
_NEAREST_TO_T = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)


def to_transposed(config: UNetConfig, params: dict) -> tuple[UNetConfig, dict]:
    """Nearest-upsample + 3x3 conv as the equal 4x4 stride-2 transposed conv (exact)."""
    if config.resample == "transposed":
        return config, params
    flat = to_flat(params)
    a = _NEAREST_TO_T
    for key in [f"{b.path}.conv.weight" for b in walk(config) if b.kind == "up"]:
        flat[key] = np.einsum("ka,oabi,lb->okli", a, flat[key], a).astype(np.float32)
    return replace(config, resample="transposed"), to_tree(flat)

