#!/usr/bin/env python3
"""How close a study's recorded latencies are to the same models timed alone afterwards.

  uv run python benchmarks/recorded_latency.py STUDY [--results results ...] [--repeats 5]

For every COMPLETE trial of the study under the first ``--results`` folder (its SQLite
storage), it loads the checkpoint, times the sampling loop by the protocol (warm-up,
median of 10 runs, batch 1) ``--repeats`` times with nothing else running, and compares
the median with the latency the trial recorded during the search. Further ``--results``
folders (the same study run again, say before and after a change) are compared side by
side on the same timing, for their trials with the same parameters. Run it on a quiet
machine: its only use is to check the measurement inside a search.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from engine.device.bench import device_fingerprint, sampling_latency  # first: binds OpenBLAS
from engine.io.models import load_model
from search.storage import study as st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--results", type=Path, nargs="+", default=[Path("results")])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    runs = [st.load_existing(st.open_storage(st.default_storage(r), create=False), args.study)
            .trials for r in args.results]
    print(f"device: {device_fingerprint()}\n")
    print("| trial | " + " | ".join(f"{r} ms" for r in args.results) + " | alone ms |")
    print("|---" * (len(runs) + 2) + "|")
    errors: list[list[float]] = [[] for _ in runs]
    for i, first in enumerate(runs[0]):
        same = [r[i] if i < len(r) and r[i].params == first.params else None for r in runs]
        if not first.values or any(t is None or not t.values for t in same):
            continue
        folder = args.results[0] / args.study / f"trial-{first.number}" / "checkpoint"
        config, model = load_model(folder)
        alone = float(np.median([sampling_latency(model, config, batch=1, runs=10).median_ms
                                 for _ in range(args.repeats)]))
        cells = []
        for err, t in zip(errors, same):
            assert t is not None and t.values
            err.append(t.values[1] / alone - 1)
            cells.append(f"{t.values[1]:.1f} ({err[-1]:+.0%})")
        print(f"| {first.number} | " + " | ".join(cells) + f" | {alone:.1f} |")
    print()
    for folder, err in zip(args.results, errors):
        e = np.abs(np.array(err))
        print(f"{folder}: {int((e <= 0.1).sum())}/{len(e)} within ±10% of alone; median "
              f"|error| {np.median(e):.0%}, max {e.max():.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
