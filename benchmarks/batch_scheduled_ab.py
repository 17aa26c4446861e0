#!/usr/bin/env python3
"""Sampling with and without the one-core ``SCHED_BATCH`` policy, alternating in one process
(``engine.device.contention.batch_scheduled``; benchmarks/cpu_speed.md, session 17).

Every thread of the process is held on one core, as a latency measurement holds it; each
round times ``--calls`` DDIM runs of the ``demo`` U-Net with the policy, then as many
without, and counts the process's context switches. Prints one JSON line per variant, the
medians of the round medians last. Linux only (the policy and the pinning are Linux's).

  OPENBLAS_NUM_THREADS=1 uv run python benchmarks/batch_scheduled_ab.py --batch 1 16
  # on a GPU host without uv (benchmarks/gpu/README.md): PYTHONPATH=. python3 benchmarks/...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import engine  # noqa: F401, I001  (binds OpenBLAS before mlx loads)
import mlx.core as mx
from throughput import CONFIGS

from engine.config import ScheduleConfig, UNetConfig
from engine.model.unet import UNet
from engine.sampling import samplers

DEMO = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in CONFIGS["demo"].items()})


def switches() -> int:
    """Voluntary and involuntary context switches of every thread of this process."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args()
    model = UNet(DEMO)
    mx.eval(model.parameters())
    schedule = ScheduleConfig(sampler="ddim", steps=args.steps)
    core = min(os.sched_getaffinity(0))
    landed = samplers.batch_scheduled
    variants = {"batch": landed, "default": contextlib.nullcontext}
    for batch in args.batch:
        def run(batch: int = batch) -> None:
            samplers.generate(model, schedule, batch, 0, DEMO.image_size, DEMO.channels)

        run()  # trace and first touch, before the pinning (as a process starts)
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {core})
        times: dict[str, list[float]] = {k: [] for k in variants}
        counts: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for _ in range(args.rounds):
                for name, policy in variants.items():
                    samplers.batch_scheduled = policy
                    run()
                    ms, before = [], switches()
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        run()
                        ms.append((time.perf_counter() - start) * 1e3)
                    times[name].append(statistics.median(ms))
                    counts[name].append((switches() - before) / args.calls)
        finally:
            samplers.batch_scheduled = landed
        for name in variants:
            print(json.dumps({"batch": batch, "variant": name, "device": str(mx.default_device()),
                              "median_ms": statistics.median(times[name]),
                              "round_medians_ms": [round(t, 2) for t in times[name]],
                              "switches_per_call": statistics.median(counts[name])}), flush=True)


if __name__ == "__main__":
    main()
