"""Does a study's best front trial draw digits? Legibility of its samples beside real digits.

What ``diffnas legibility`` prints (:mod:`search.legibility`: the best front trial is the
non-dominated feasible COMPLETE point of lowest FID, scored by the shipped digits
classifier beside held-out real digits), plus the study's wall time, the span from its
first trial's start to its last trial's end, and its device time, the sum of its trials'
child-process CPU time.

    uv run python benchmarks/legibility.py --study demo --results results --png samples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

import engine  # noqa: F401  (binds an optimised BLAS before mlx loads)
from engine.data.images import save_grid
from search.legibility import study_legibility
from search.storage import record as rec
from search.storage import study as st

GRID = 100  # a 10 x 10 grid


def study_times(study: optuna.Study) -> tuple[float | None, float]:
    """``(wall_s, device_s)``: first trial start to last trial end; sum of trials' ``cpu_s``."""
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    cpu = sum(float((rec.read(t).finished.timings or {}).get("cpu_s", 0.0)) for t in trials)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under --results)")
    parser.add_argument("--trial", help="score this trial (3) or derived point (d0) instead")
    parser.add_argument("--n", type=int, default=500, help="samples, and real digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path, help="write a 10x10 grid of the samples here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # StudyError and CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    st.check_name(args.study)
    url = args.storage or st.default_storage(args.results)
    study = st.load_existing(st.open_storage(url, create=False), args.study)
    scores, samples = study_legibility(study, args.trial, args.n, args.seed)
    print(f"study {study.study_name}, " + "\n".join(scores.lines()))
    wall, cpu = study_times(study)
    print(f"study wall time {'?' if wall is None else f'{wall:.0f} s'} (first trial start to "
          f"last end), trials' CPU time {cpu:.0f} s")
    if args.png:
        save_grid(samples[:GRID], args.png, nrow=10)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
