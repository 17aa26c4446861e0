"""Architecture morphisms for the search: neighbours, mutation and inherited weights.

A child architecture one mutation away from its parent (:func:`neighbours`,
:func:`mutate`) starts from the parent's weights, carried over by a chain of the
morphisms of :mod:`engine.model.morphisms` (:func:`inherit`), which this module also
offers: :func:`widen`, :func:`narrow`, :func:`deepen`, :func:`add_attention`,
:func:`densify` and :func:`to_transposed`.

``params`` is a parameter tree as returned by ``UNet.parameters()`` (or a checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from engine.config import ACTIVATIONS, Config, UNetConfig
from engine.model.channels import items
from engine.model.morphisms import (
    add_attention,
    deepen,
    densify,
    drop_attention,
    narrow,
    shallow,
    to_transposed,
    widen,
)
from engine.model.unet import UNet
from engine.training.train import TrainState, init_state

__all__ = [
    "add_attention", "deepen", "densify", "inherit", "inherited_state", "mutate", "narrow",
    "neighbours", "reachable", "to_transposed", "widen",
]

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

    Anything else (``channels``, ``time_emb_dim``, ``num_classes``, ``head_dim`` with
    attention, the number of levels, dense -> separable, transposed -> nearest, width ratios
    that are not powers of two) returns None. A class-conditional parent's label embedding
    (it feeds the time embedding, which no morphism changes) passes to the child as it is.
    """
    p, c = parent_config, child_config
    if (p.channels, p.time_emb_dim, p.num_classes) != (c.channels, c.time_emb_dim, c.num_classes):
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
    if c.num_classes > 0:
        params = {**params, "label_emb": parent_params["label_emb"]}
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
        cfg, params = drop_attention(cfg, params, level)
    while cfg.num_res_blocks < child.num_res_blocks:
        cfg, params = deepen(cfg, params)
    while cfg.num_res_blocks > child.num_res_blocks:
        cfg, params = shallow(cfg, params)
    while cfg.base_width < child.base_width:
        cfg, params = widen(cfg, params)
    while cfg.base_width > child.base_width:
        cfg, params = narrow(cfg, params)
    if cfg.base_width != child.base_width:
        raise _Unreachable
    for level, (have, want) in enumerate(zip(cfg.widths, child.widths)):
        while have < want:
            cfg, params = widen(cfg, params, level, strict=False)
            have = cfg.widths[level]
        if have > want:
            cfg, params = narrow(cfg, params, level, want)
    for level in sorted(set(child.attn_levels) - set(cfg.attn_levels)):
        cfg, params = add_attention(replace(cfg, head_dim=child.head_dim), params, level)
    return replace(cfg, **free), params




def inherited_state(config: Config, params: dict) -> TrainState:
    """A fresh :class:`engine.training.train.TrainState` whose weights and EMA weights are ``params``.

    The optimizer starts fresh; train it with ``engine.training.train.train`` as usual.
    """
    state = init_state(config)
    state.model.update(params)
    state.ema = tree_unflatten([(k, mx.array(v)) for k, v in items(params).items()])
    mx.eval(state.model.parameters(), state.ema)
    return state
