#!/usr/bin/env python3
"""Where a study's wall time went: mean seconds per trial per phase, and the two shares.

  uv run python benchmarks/walltime.py STUDY [--results results] [--storage URL]

Reads the breakdown every trial recorded (:class:`workers.records.WallTime`) and each
worker's own costs, and prints a markdown table (``search.walltime.table``) under the
device the trials ran on. The overhead share is everything but training steps and FID
sampling over the trials' wall time; the busy share is the trials' wall time over
``workers x`` the study's wall time. benchmarks/walltime.md holds the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search import walltime
from search.storage import record as rec
from search.storage import study as st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--storage", help="study storage URL (default: the results folder's)")
    args = ap.parse_args(argv)
    try:
        storage = st.open_storage(args.storage or st.default_storage(args.results), create=False)
        study = st.load_existing(storage, args.study)
    except st.StudyError as err:
        print(f"walltime: {err}", file=sys.stderr)
        return 2
    summary = walltime.summarize(study)
    if summary is None:
        print(f"study {args.study}: no trial recorded a wall-time breakdown", file=sys.stderr)
        return 1
    devices = {str(r.finished.device.get("chip")) + ", BLAS " + str(r.finished.device.get("blas"))
               for r in map(rec.read, study.get_trials(deepcopy=False)) if r.finished.device}
    print(f"study {args.study}; device: {'; '.join(sorted(devices)) or '?'}\n")
    print(walltime.table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
