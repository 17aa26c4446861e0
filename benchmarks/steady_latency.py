#!/usr/bin/env python3
"""Does the recorded latency hold on a busy machine? The same models of the demo space
measured by the trial protocol (``engine.measure.measure_latency``: reference workload
before and after each round, disturbed rounds taken again, clean rounds pooled to a +-5%
confidence interval) with nothing of ours running, then beside a CPU hog (``--hogs``
processes spinning, outside diffnas's device lock), then ``--repeats`` repeats of one
model's measurement.

  uv run python benchmarks/steady_latency.py [--models 8] [--hogs 2] [--repeats 20]
      [--seed 0] [--json results/steady_latency.json]

The plain protocol (:func:`engine.device.bench.sampling_latency`: median of 5 runs,
re-measured only when the spread exceeds 10%) is timed beside it for comparison. Each
phase prints the load average, because other users of the machine are load too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna

from engine.device.bench import device_fingerprint, sampling_latency  # first: binds BLAS
from engine.measure import measure_latency
from engine.model.unet import UNet
from search.space import load_space

HOG = "while True: pass"


def demo_models(n: int, seed: int) -> list[tuple[str, object, object]]:
    """``n`` configs drawn at random from the demo space, built with random weights."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("demo")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    models = []
    for _ in range(n):
        config = space.decode(study.ask(space.distributions()).params)
        model = UNet(config.unet)
        u, s = config.unet, config.schedule
        name = (f"{u.base_width}x{','.join(map(str, u.width_mults))} R{u.num_res_blocks} "
                f"attn{''.join(map(str, u.attn_levels)) or '-'} {s.sampler} {s.steps}")
        models.append((name, model, config))
    return models


def phase(models: list, label: str) -> list[dict]:
    rows = []
    for name, model, config in models:
        start = time.perf_counter()
        stat = measure_latency(model, config)
        seconds = time.perf_counter() - start
        plain = sampling_latency(model, config, batch=1).median_ms
        rows.append({"model": name, "ms": stat.median_ms, "plain_ms": plain, "ci": stat.ci,
                     "rounds": stat.rounds, "disturbed_rounds": stat.disturbed_rounds,
                     "disturbed": stat.disturbed, "ratio": stat.reference_ratio,
                     "seconds": seconds, "load": os.getloadavg()[0]})
        print(f"{label}: {json.dumps(rows[-1])}", flush=True)
    return rows


def with_hogs(count: int, fn):
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(count)]
    try:
        time.sleep(1.0)
        return fn()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def loads(rows: list[dict]) -> str:
    return f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f}"


def report(quiet: list[dict], busy: list[dict], repeats: list[dict], hogs: int) -> str:
    lines = [("| model | quiet ms (plain) | with hog ms (plain) | recorded/quiet | rounds "
              "(disturbed) | marked disturbed | ok |"), "|---|---:|---:|---:|---:|---|---|"]
    ok = plain_ok = 0
    for q, b in zip(quiet, busy):
        dev, pdev = b["ms"] / q["ms"] - 1, b["plain_ms"] / q["plain_ms"] - 1
        good = abs(dev) <= 0.10 or b["disturbed"]
        ok, plain_ok = ok + good, plain_ok + (abs(pdev) <= 0.10)
        lines.append(f"| {q['model']} | {q['ms']:.1f} ({q['plain_ms']:.1f}) | {b['ms']:.1f} "
                     f"({b['plain_ms']:.1f}) | {dev:+.0%} (plain {pdev:+.0%}) | {b['rounds']} "
                     f"({b['disturbed_rounds']}) | {'yes' if b['disturbed'] else 'no'} | "
                     f"{'yes' if good else 'NO'} |")
    ms = np.array([r["ms"] for r in repeats])
    within = np.abs(ms / np.median(ms) - 1) <= 0.05
    lines += ["", (f"- with {hogs} hog processes: {ok}/{len(busy)} within +-10% of the quiet "
                   f"value or marked disturbed (plain protocol: {plain_ok}/{len(busy)} within "
                   f"+-10%); load average during the quiet phase {loads(quiet)}, with the "
                   f"hogs {loads(busy)}"),
              (f"- {len(repeats)} repeats of `{repeats[0]['model']}`: {within.sum()}/"
               f"{len(repeats)} within +-5% of their median ({np.median(ms):.1f} ms; range "
               f"{ms.min():.1f}-{ms.max():.1f}); {sum(r['disturbed'] for r in repeats)} "
               f"marked disturbed; load average {loads(repeats)}")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    models = demo_models(args.models, args.seed)
    phase(models[:1], "warm-up")  # compile and calibrate the reference first
    quiet = phase(models, "quiet")
    busy = with_hogs(args.hogs, lambda: phase(models, "hog"))
    repeats = phase(models[:1] * args.repeats, "repeat")
    text = report(quiet, busy, repeats, args.hogs)
    print(f"\nDevice: {device_fingerprint()}\n\n{text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quiet": quiet, "hog": busy, "repeats": repeats,
                                         "device": device_fingerprint()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
