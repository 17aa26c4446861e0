#!/usr/bin/env python3
"""Does a small model's GPU sampling latency drift when it is measured back to back, and does
emptying MLX's buffer cache first hold it still? (issue 16, part 4; a companion of
``latency_stability.py``)

  python3 benchmarks/gpu/latency_repeat.py

Three configs of ``benchmarks/latency_predictor.py`` (seed 0), each measured as the median
of 10 runs at batch 1, in 6 rounds and four ways:

- ``back``: three measurements of the same config in a row, then the next config;
- ``cleared``: the same, each after ``mx.clear_cache()`` and one call;
- ``interleaved``: one measurement per config per round;
- ``cleared_interleaved``: the same, each after ``mx.clear_cache()`` and one call.

It prints every measurement (ms) and the share within +-10% of the config's median.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/

import engine  # noqa: F401, I001  (binds OpenBLAS before mlx loads)
import mlx.core as mx
import numpy as np
from latency_predictor import random_config

from engine.device.bench import time_call
from engine.model.unet import UNet
from engine.sampling.samplers import generate

MODES = {"back": (3, False), "cleared": (3, True), "interleaved": (1, False),
         "cleared_interleaved": (1, True)}  # measurements in a row, clear the cache first


def main() -> int:
    rng = np.random.default_rng(0)
    configs = [random_config(rng, 16) for _ in range(3)]
    models = [UNet(c.unet) for c in configs]
    calls = [(lambda m=m, c=c: mx.eval(generate(m, c.schedule, 1, 0, 16, c.unet.channels)))
             for m, c in zip(models, configs)]
    for fn in calls:
        fn()
    for mode, (in_a_row, clear) in MODES.items():
        found: dict[int, list[float]] = {i: [] for i in range(len(calls))}
        for _ in range(6):
            for i, fn in enumerate(calls):
                for _ in range(in_a_row):
                    if clear:
                        mx.clear_cache()
                        fn()
                    found[i].append(time_call(fn, runs=10, warmup=0, retries=0).median_ms)
        print(mode, {i: [round(v, 1) for v in ms] for i, ms in found.items()}, flush=True)
        share = np.mean([np.mean(np.abs(np.array(ms) / np.median(ms) - 1) <= 0.1)
                         for ms in found.values()])
        print(mode, "within +-10% of the config's median:", round(float(share), 3), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
