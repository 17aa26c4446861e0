#!/usr/bin/env python3
"""The steady latency protocol on a device whose reference scatters by itself: a fixed 10%
tolerance against the reference's own (``engine.device.steady.jitter_tolerance``), side by
side in one process (issue 16, parts 3 and 4).

  python3 benchmarks/gpu/latency_tolerance.py [--configs 3] [--repeats 3] [--json OUT]

Configs of ``benchmarks/latency_predictor.py`` (seed 0) at batch 1; each measured
``--repeats`` times each way by ``engine.measure.measure_latency``, alternating. Per way it
prints the seconds a measurement took, its rounds, how many were marked disturbed, and how
far the repeats of one config stray from their median.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/

import engine  # noqa: F401, I001  (binds OpenBLAS before mlx loads)
import mlx.core as mx
import numpy as np
from latency_predictor import describe, random_config

from engine.device.bench import device_fingerprint
from engine.device.steady import REFERENCE_TOLERANCE, Reference, steady_call
from engine.model.unet import UNet
from engine.sampling.samplers import generate

WAYS = {"fixed 10%": REFERENCE_TOLERANCE, "own scatter": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    configs = [random_config(rng, 16) for _ in range(args.configs)]
    models = [UNet(c.unet) for c in configs]
    reference = Reference()
    print(f"reference: usual {reference.usual_ms:.3f} ms, its own tolerance "
          f"{reference.tolerance:.1%}", flush=True)
    rows = []
    for rep in range(args.repeats):
        for i, (model, config) in enumerate(zip(models, configs)):
            for way, tolerance in WAYS.items():
                def call(m=model, c=config) -> None:
                    mx.eval(generate(m, c.schedule, 1, 0, c.unet.image_size, c.unet.channels))
                start = time.perf_counter()
                stat = steady_call(call, 5, reference, tolerance=tolerance)
                rows.append({"repeat": rep, "config": i, "way": way, "ms": stat.median_ms,
                             "rounds": stat.rounds, "disturbed": stat.disturbed,
                             "disturbed_rounds": stat.disturbed_rounds, "ci": stat.ci,
                             "ratio": stat.reference_ratio,
                             "seconds": time.perf_counter() - start})
                print(json.dumps(rows[-1]), flush=True)
    summary = {"device": device_fingerprint(), "reference_ms": reference.usual_ms,
               "tolerance": reference.tolerance,
               "configs": [describe(c) for c in configs]}
    for way in WAYS:
        mine = [r for r in rows if r["way"] == way]
        stray = [abs(r["ms"] / np.median([q["ms"] for q in mine if q["config"] == r["config"]])
                     - 1) for r in mine]
        summary[way] = {"seconds_mean": float(np.mean([r["seconds"] for r in mine])),
                        "rounds_mean": float(np.mean([r["rounds"] for r in mine])),
                        "disturbed": sum(r["disturbed"] for r in mine), "n": len(mine),
                        "within_10": float(np.mean(np.array(stray) <= 0.1))}
    print(json.dumps({k: v for k, v in summary.items() if k != "device"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
