#!/usr/bin/env python3
"""Re-fit the memory model's coefficients on this device (engine.device.memory.fit).

  uv run python benchmarks/memory_calibrate.py [--write]   # ~30 min on 2 shared CPU cores

Measures every ``engine.device.memory.fit.CALIBRATION_CONFIGS`` entry in every training
mode and for sampling, fits each mode and times checkpointing and bf16. It prints the
table as JSON (progress goes to stderr); ``--write`` also replaces
``engine/device/memory/calibration.json``, which the predictions read. Check the new table
on held-out configs with ``benchmarks/memory_accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

import engine  # noqa: F401  (first: engine binds OpenBLAS before mlx loads)
from engine.device.memory.fit import calibrate
from engine.device.memory.model import CALIBRATION_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help=f"replace {CALIBRATION_FILE.name} with the new table")
    args = parser.parse_args()
    table = calibrate(log=lambda s: print(s, file=sys.stderr, flush=True))
    text = json.dumps(table, indent=1) + "\n"
    print(text, end="")
    if args.write:
        CALIBRATION_FILE.write_text(text)
        print(f"wrote {CALIBRATION_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
