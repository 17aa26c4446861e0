"""How the entries of a latency table (:mod:`engine.model.latency`) are timed: a block of a
U-Net, or the sampler with a network that costs nothing, run as a probe of K copies per
``mx.eval``; and a whole sampling call, which the table's calibration points compare with.
Timed as sampling runs: on one core the graph-building thread is a ``SCHED_BATCH`` thread
(:func:`engine.device.contention.batch_scheduled`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.config import Config
from engine.device.bench import LatencyStat, time_call
from engine.device.contention import batch_scheduled
from engine.model.blocks import Block
from engine.model.unet import UNet, timestep_embedding
from engine.sampling.samplers import generate

TARGET_MS = 4.0  # each timed call runs enough block copies to take about this long
MAX_COPIES = 64

Probe = Callable[[], list[mx.array]]


def time_ms(fn: Callable[[], Any], clock: str = "wall", runs: int = 5, warmup: int = 1,
            retries: int = 2) -> LatencyStat:
    """:func:`engine.device.bench.time_call` on the ``wall`` or ``cpu`` clock."""
    timer = time.perf_counter if clock == "wall" else time.process_time
    return time_call(fn, runs, warmup, retries, clock=timer)


def sampling_latency(model: UNet, config: Config, batch: int = 1, clock: str = "wall",
                     runs: int = 5) -> LatencyStat:
    """:func:`engine.device.bench.sampling_latency` on a chosen clock: what the table predicts."""
    u = config.unet
    return time_ms(lambda: generate(model, config.schedule, batch, 0, u.image_size, u.channels),
                   clock, runs=runs)


def measure_ms(probe: Probe, clock: str = "wall", runs: int = 7) -> float:
    """Milliseconds per call of ``probe``: K copies per ``mx.eval``, lower quartile of ``runs``.

    A table entry takes the lower quartile rather than the median: on a shared machine a
    burst of other work inflates a few of these short timings, and only ever slows them.
    Timed as sampling runs (:func:`engine.device.contention.batch_scheduled`).
    """
    with batch_scheduled():
        mx.eval(probe())  # build and first touch
        single = time_ms(lambda: mx.eval(probe()), clock, runs=3, retries=0).median_ms
        copies = max(1, min(MAX_COPIES, math.ceil(TARGET_MS / max(single, 1e-3))))
        stat = time_ms(lambda: mx.eval([y for _ in range(copies) for y in probe()]), clock,
                       runs=runs, retries=0)
    return float(np.percentile(stat.samples_ms, 25)) / copies


def block_probe(model: UNet, block: Block, batch: int) -> Probe:
    """A call that runs ``block`` of ``model`` once on fixed random inputs."""
    cfg, kind = model.config, block.kind
    xs = [mx.random.normal((batch, block.res, block.res, w)) for _, w in block.ins]
    temb = mx.random.normal((batch, cfg.time_emb_dim))
    t = mx.full((batch,), 0.5)
    mx.eval(xs, temb, t)
    if kind == "time":
        return lambda: [model.time_out(model.act(model.time_in(
            timestep_embedding(t, cfg.base_width))))]
    if kind == "conv_in":
        return lambda: [model.conv_in(xs[0])]
    if kind == "out":
        return lambda: [model.conv_out(model.act(model.norm_out(xs[0])))]
    module = _submodule(model, block.path)
    if kind == "res" and len(xs) == 2:
        return lambda: [module(mx.concatenate(xs, axis=-1), temb)]
    if kind == "res":
        return lambda: [module(xs[0], temb)]
    return lambda: [module(xs[0])]


def _submodule(model: UNet, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def sampler_probe(config: Config, batch: int) -> Probe:
    """The sampling call with a network that costs nothing: the per-call overhead.

    Guidance's own arithmetic (one subtract, multiply and add a step) is left out of it:
    its network calls on twice the batch are the blocks' part (:func:`engine.model.latency.raw_latency_ms`).
    """
    u, s = config.unet, replace(config.schedule, guidance=1.0)
    free = _Free()
    return lambda: [generate(free, s, batch, 0, u.image_size, u.channels)]


class _Free(nn.Module):
    """A network that returns its input: costs no time, keeps the sampler's arithmetic."""

    def __call__(self, x: mx.array, t: mx.array) -> mx.array:
        return x
