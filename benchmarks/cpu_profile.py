#!/usr/bin/env python3
"""Interleaved A/B of the CPU levers of issue 16 part 2, in one process (benchmarks/cpu_speed.md).

Each variant is the engine's own code with some levers swapped back for the formulation
they replaced (written out below). Every variant is built and traced first (compiled
while its swap is active), then timed in ``--rounds`` rounds that alternate between the
variants; the minimum per variant is reported, on the chosen clock. On a shared machine
use ``--clock cpu`` (this process's CPU seconds) and 1 BLAS thread.

  OPENBLAS_NUM_THREADS=1 uv run python benchmarks/cpu_profile.py --clock cpu
  OPENBLAS_NUM_THREADS=2 uv run python benchmarks/cpu_profile.py --variants now split2 \\
      --metrics sample_b16 sample_b1 --clock wall     # the 2-stream batch split, quiet machine

Variants (cumulative): ``s6`` is session 6's model (GroupNorm reduced over axes (1, 3),
MLX's attention kernel); ``gn`` adds the per-channel-sum GroupNorm; ``now`` the
polynomial-exp softmax (the engine as it is); ``split2`` samples with the batch split
over two CPU streams.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: F401, I001  (binds OpenBLAS before mlx loads)
import mlx.core as mx
import numpy as np

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.model import norm, unet
from engine.sampling.samplers import generate
from engine.training import train as etrain

DEMO = UNetConfig(image_size=16, channels=1, base_width=32, width_mults=(1, 2),
                  num_res_blocks=1, attn_levels=(1,), head_dim=32)
VARIANTS = ("s6", "gn", "now", "split2")
METRICS = ("train_b32", "sample_b1", "sample_b16")


def _gn_axes13(self: Any, x: mx.array) -> mx.array:
    """Session 6's GroupNorm: statistics reduced over axes (1, 3) of (B, P, G, C/G)."""
    @mx.compile
    def f(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
        xg = x.reshape(x.shape[0], -1, self.num_groups, x.shape[-1] // self.num_groups)
        xc = xg - xg.mean(axis=(1, 3), keepdims=True)
        var = (xc * xc).mean(axis=(1, 3), keepdims=True)
        return (xc * mx.rsqrt(var + self.eps)).reshape(x.shape) * w + b
    return f(x, self.weight, self.bias)  # type: ignore[no-any-return]


def _attn_sdpa(self: Any, x: mx.array) -> mx.array:
    """Session 6's attention: MLX's fused kernel (its softmax on MLX's ``exp``)."""
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
    qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
    o = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             scale=1.0 / math.sqrt(c // self.heads))
    return x + self.out(o.transpose(0, 2, 1, 3).reshape(b, h * w, c)).reshape(b, h, w, c)


@contextmanager
def swapped(variant: str) -> Any:
    """The engine with the levers that ``variant`` lacks swapped back."""
    saved = (norm.GroupNorm.__call__, unet.Attention.__call__)
    if variant == "s6":
        norm.GroupNorm.__call__ = _gn_axes13
    if variant in ("s6", "gn"):
        unet.Attention.__call__ = _attn_sdpa
    os.environ["DIFFNAS_CPU_STREAMS"] = "2" if variant == "split2" else "1"
    try:
        yield
    finally:
        norm.GroupNorm.__call__, unet.Attention.__call__ = saved


def build(variant: str, metric: str) -> Callable[[], None]:
    """A synchronised call of ``metric`` for ``variant``, traced (compiled) now."""
    cfg = Config(unet=DEMO, schedule=ScheduleConfig(sampler="ddim", steps=20),
                 train=TrainConfig(batch_size=32, steps=10**6))
    with swapped(variant):
        if metric == "train_b32":
            state = etrain.init_state(cfg)
            step = etrain.training_update(state)
            x0 = mx.array(np.random.default_rng(0).uniform(-1, 1, (32, 16, 16, 1)), mx.float32)

            def fn() -> None:
                loss = step(x0, mx.random.key(1))
                mx.eval(loss, state.model.state, state.optimizer.state)
        else:
            mx.random.seed(0)
            model = unet.UNet(DEMO)
            mx.eval(model.parameters())
            n = int(metric.split("_b")[1])

            streams = "2" if variant == "split2" else "1"

            def fn() -> None:
                os.environ["DIFFNAS_CPU_STREAMS"] = streams  # read at every call
                generate(model, cfg.schedule, n, 0, 16, 1)
        fn()
        fn()
    return fn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS)
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="calls per timing, per round")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = p.parse_args()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    calls = {(v, m): build(v, m) for m in a.metrics for v in a.variants}
    best: dict[tuple[str, str], float] = {}
    for _ in range(a.rounds):
        for key, fn in calls.items():
            start = clock()
            for _ in range(a.repeats):
                fn()
            best[key] = min(best.get(key, math.inf), (clock() - start) / a.repeats)
    print(f"| variant ({a.clock} clock, min of {a.rounds} rounds x {a.repeats}) | "
          + " | ".join(a.metrics) + " |")
    print("|---" * (len(a.metrics) + 1) + "|")
    for v in a.variants:
        cells = [f"{32 / best[v, m]:.1f} img/s" if m == "train_b32" else f"{best[v, m] * 1e3:.1f} ms"
                 for m in a.metrics]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
