"""The block structure of the U-Net: the one walk that every other view of the network reads.

:func:`walk` lists the weight-bearing blocks of the U-Net for a :class:`UNetConfig` in
execution order: the order of the encoder, middle and decoder blocks, where attention
sits, which skip each decoder block concatenates, and the parameter path of each block.
:class:`engine.model.unet.UNet` builds its modules from it, :mod:`engine.model.cost`
prices it, :mod:`engine.model.morph` moves weights along its channel spaces and
:mod:`engine.model.latency` keys its table by it.

A *space* is one channel index set that several tensors share: the stream a level's
blocks write (``L<level>``), the output of ``conv_in`` (``in``), the time embedding
(``temb``), the sinusoid (``sin``) and the image (``img``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from engine.config import UNetConfig

KINDS = ("time", "conv_in", "res", "attn", "down", "up", "out")


class Space(NamedTuple):
    """A channel space and its width."""

    name: str
    width: int


@dataclass(frozen=True)
class Block:
    """One weight-bearing block of the U-Net.

    ``path`` is its prefix in the parameter tree (``time`` stands for ``time_in`` and
    ``time_out``, ``out`` for ``norm_out`` and ``conv_out``); ``name`` its name in
    :func:`engine.model.cost.layers`. ``stage`` is ``down``, ``mid`` or ``up`` (empty for
    the stem and the head), ``level`` the level whose stream the block writes (None for
    the stem and the head) and ``index`` its position among the blocks of its kind in
    that level. ``res`` is the spatial size of its input, ``ins`` the concatenated parts
    of its input (the decoder's ``[h, skip]``) and ``out`` its output.
    """

    path: str
    name: str
    kind: str  # one of KINDS
    stage: str
    level: int | None
    index: int
    res: int
    ins: tuple[Space, ...]
    out: Space

    @property
    def cin(self) -> int:
        return sum(part.width for part in self.ins)

    @property
    def cout(self) -> int:
        return self.out.width

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The prefixes of its weights in the parameter tree."""
        return _PREFIXES.get(self.path, (self.path,))


_PREFIXES = {"time": ("time_in", "time_out"), "out": ("norm_out", "conv_out")}


def walk(cfg: UNetConfig) -> tuple[Block, ...]:
    """Every block of the U-Net for ``cfg``, in execution order."""
    return tuple(_walk(cfg))


def _walk(cfg: UNetConfig) -> Iterator[Block]:
    size, last = cfg.image_size, len(cfg.widths) - 1
    yield Block("time", "time", "time", "", None, 0, 1, (Space("sin", cfg.base_width),),
                Space("temb", cfg.time_emb_dim))
    cur = Space("in", cfg.base_width)
    yield Block("conv_in", "conv_in", "conv_in", "", None, 0, size,
                (Space("img", cfg.channels),), cur)
    skips = [cur]
    for level, width in enumerate(cfg.widths):
        res = size >> level
        space = Space(f"L{level}", width)
        for b in range(cfg.num_res_blocks):
            yield _res("down", level, b, res, (cur,), space)
            yield from _attention(cfg, "down", level, b, res, space)
            cur = space
            skips.append(space)
        if level < last:
            yield Block(f"downsamples.{level}", f"down{level}.downsample", "down", "down",
                        level, 0, res, (space,), space)
            skips.append(space)
    res = size >> last
    yield Block("mid1", "mid1", "res", "mid", last, 0, res, (cur,), cur)
    yield from _attention(cfg, "mid", last, 0, res, cur)
    yield Block("mid2", "mid2", "res", "mid", last, 1, res, (cur,), cur)
    for i, level in enumerate(reversed(range(last + 1))):
        res = size >> level
        space = Space(f"L{level}", cfg.widths[level])
        for b in range(cfg.num_res_blocks + 1):
            yield _res("up", level, b, res, (cur, skips.pop()), space, i)
            yield from _attention(cfg, "up", level, b, res, space, i)
            cur = space
        if level > 0:
            yield Block(f"upsamples.{i}", f"up{level}.upsample", "up", "up", level, 0, res,
                        (space,), space)
    yield Block("out", "out", "out", "", None, 0, size, (cur,), Space("img", cfg.channels))


def _res(stage: str, level: int, b: int, res: int, ins: tuple[Space, ...], out: Space,
         i: int | None = None) -> Block:
    """A ResBlock of the encoder (``down.<level>``) or the decoder (``up.<i>``, ``i`` counting
    the decoder's levels from the deepest)."""
    path = f"down.{level}.blocks.{b}" if i is None else f"up.{i}.blocks.{b}"
    return Block(path, f"{stage}{level}.{b}", "res", stage, level, b, res, ins, out)


def _attention(cfg: UNetConfig, stage: str, level: int, b: int, res: int, space: Space,
               i: int | None = None) -> Iterator[Block]:
    """The self-attention after a ResBlock, where ``level`` has attention."""
    if level not in cfg.attn_levels:
        return
    if stage == "mid":
        path, name = "mid_attn.0", "mid.attn"
    else:
        path = f"down.{level}.attns.{b}" if i is None else f"up.{i}.attns.{b}"
        name = f"{stage}{level}.{b}.attn"
    yield Block(path, name, "attn", stage, level, b, res, (space,), space)
