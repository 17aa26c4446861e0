#!/usr/bin/env python3
"""Re-fit the memory model's coefficients on this device (engine.device.memory.fit).

  uv run python benchmarks/memory_calibrate.py [--write] [--save-rows F]  # ~35 min, 2 CPU cores
  uv run python benchmarks/memory_calibrate.py --rows F [--write]         # refit only, ~2 min

Measures every ``engine.device.memory.fit.CALIBRATION_CONFIGS`` entry in every training
mode and for sampling, fits each mode and times checkpointing and bf16. It prints the
table as JSON (progress goes to stderr); ``--write`` also replaces
``engine/device/memory/calibration.json``, which the predictions read. ``--save-rows``
keeps the measured peaks (a JSON list), and ``--rows`` refits from such a file instead of
measuring again: the way to try a change of the model's formula. Check the new table on
held-out configs with ``benchmarks/memory_accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import engine  # noqa: F401  (first: engine binds OpenBLAS before mlx loads)
from engine.device.memory.fit import CALIBRATION_CONFIGS, calibrate, collect
from engine.device.memory.model import CALIBRATION_FILE

_ROW_KEYS = {"name", "unet", "mode", "batch", "mb"}


def _load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path``; exits with a one-line error naming the file if they are not."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"--rows {path}: {exc}")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and _ROW_KEYS <= set(r) for r in rows):
        sys.exit(f"--rows {path}: not a list of measured rows with keys {sorted(_ROW_KEYS)}")
    return rows


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help=f"replace {CALIBRATION_FILE.name} with the new table")
    parser.add_argument("--save-rows", type=Path, help="write the measured peaks to this file")
    parser.add_argument("--rows", type=Path, help="fit these measured peaks, measure none")
    args = parser.parse_args()
    if args.rows:
        rows = _load_rows(args.rows)
    else:
        rows = collect(CALIBRATION_CONFIGS, _log)
        if args.save_rows:
            args.save_rows.write_text(json.dumps(rows) + "\n")
    table = calibrate(log=_log, rows=rows)
    text = json.dumps(table, indent=1) + "\n"
    print(text, end="")
    if args.write:
        CALIBRATION_FILE.write_text(text)
        print(f"wrote {CALIBRATION_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
