#!/usr/bin/env python3
"""How far a config's measured sampling latency drifts over minutes, absolutely and
relative to a reference config measured in the same round: the floor under any latency
predictor's accuracy on a device.

  uv run python benchmarks/latency_drift.py [--configs 6] [--rounds 15] [--seed 0]
      [--clock cpu|wall] [--json results/latency_drift.json]

It takes ``--configs`` random configs of benchmarks/latency_predictor.py (the same
generator and seed), builds each once, then in each of
``--rounds`` rounds measures every config by the protocol (warm-up, median of 10 runs,
batch 1) in a shuffled order. Per config it reports the share of rounds within +-10% of
that config's median over all rounds -- what a perfect fixed prediction would score -- and
the same for the latency divided by the reference config's latency in that round -- what a
prediction of ratios, re-anchored on one measurement, would score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from latency_predictor import describe, random_config

from engine.device.bench import device_fingerprint
from engine.model import latency  # first: engine binds OpenBLAS before mlx loads
from engine.model.unet import UNet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    clock = args.clock or latency.default_clock()
    rng = np.random.default_rng(args.seed)
    configs = [random_config(rng, args.image_size) for _ in range(args.configs)]
    models = [UNet(c.unet) for c in configs]
    order = np.random.default_rng(args.seed + 1)
    ms = np.zeros((args.rounds, len(configs)))
    start = time.time()
    for r in range(args.rounds):
        for i in order.permutation(len(configs)):
            stat = latency.sampling_latency(models[i], configs[i], 1, clock, runs=10)
            ms[r, i] = stat.median_ms
        print(f"round {r + 1}/{args.rounds}: " + " ".join(f"{v:.1f}" for v in ms[r]),
              flush=True)
    rows, absolute, relative = [], [], []
    for i, config in enumerate(configs):
        own = ms[:, i] / np.median(ms[:, i]) - 1
        ratio = ms[:, i] / ms[:, 0]
        rel = ratio / np.median(ratio) - 1
        absolute.append(float(np.mean(np.abs(own) <= 0.1)))
        relative.append(float(np.mean(np.abs(rel) <= 0.1)))
        rows.append({"config": describe(config), "median_ms": float(np.median(ms[:, i])),
                     "min_ms": float(ms[:, i].min()), "max_ms": float(ms[:, i].max()),
                     "within_10": absolute[-1], "ratio_within_10": relative[-1],
                     "rounds_ms": ms[:, i].tolist()})
    others = slice(1, None)  # the reference's ratio to itself is 1 in every round
    summary = {"device": device_fingerprint(), "clock": clock, "rounds": args.rounds,
               "seconds": time.time() - start,
               "within_10": float(np.mean(absolute)),
               "ratio_within_10": float(np.mean(relative[others]))}
    print(report(summary, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


def report(s: dict, rows: list[dict]) -> str:
    d = s["device"]
    lines = [(f"{d.get('chip')} ({d.get('backend')}), mlx {d.get('mlx')}, clock {s['clock']}, "
             f"{s['rounds']} rounds in {s['seconds']:.0f} s"),
             (f"rounds within +-10% of the config's median: {s['within_10']:.0%}; of the ratio "
             f"to config 0 in the same round: {s['ratio_within_10']:.0%}"), "",
             "| config | median ms | min-max ms | within ±10% | ratio to config 0 within ±10% |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for i, r in enumerate(rows):
        ratio = "(reference)" if i == 0 else f"{r['ratio_within_10']:.0%}"
        lines.append(f"| {r['config']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-"
                     f"{r['max_ms']:.1f} | {r['within_10']:.0%} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
