#!/usr/bin/env python3
"""Confirm the replay with real trials: the arms' own code, every proposal trained.

  python benchmarks/searchbench/confirm.py [--arms mo-asha nsga2] [--seeds 3]
      [--budget-share 0.1] [--budget-trials 40] [--jobs N] [--core-per-job]
      [--out-dir benchmarks/searchbench/confirm]

Each (arm, seed) study runs :func:`arms.run_arm` -- the replay's ask, stop and tell code --
against a :class:`live.LiveTable` instead of the recorded table: its lookup trains the
proposed config as a real trial, stopped where the arm's pruner stops it, and hands back
the fresh row. The arm then plays that row as in the replay; ``stop mismatches`` counts the
trials where it stopped elsewhere than the live run (a latency measured again at the end
of a trial can move a completed trial over a limit its first measurement was under).

The budget is the replay's rule (``--budget-trials`` full trials at the recorded table's
median device-seconds) times ``--budget-share``; the hypervolume is taken against the
replay's reference point. Each study appends every trial, as a row of the table's format
(plus ``arm`` and ``stop``), to ``trials-<arm>-<seed>.jsonl`` in ``--out-dir`` as it
finishes. Run again on the same folder, a study continues: a stored trial whose number and
parameters match is read back instead of trained (the samplers and pruners are seeded, so
a study asks the same proposals again), so a larger ``--budget-share`` extends a run.
``summary.md`` and ``summary.json`` hold each study's hypervolume at 25/50/100% of the
budget, the replay's for the same arm, seed and budget, and whether the replay's ranking
of the arms holds.

Runs on the recording machine with optuna added: numpy, optuna, ``search`` (through
arms.py; no ray), ``engine`` and ``workers``. With ``--jobs N --core-per-job`` each study
runs on a core of its own, with a device lock of its own (as record.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# The trial processes re-import this module (multiprocessing's spawn): it imports only
# what record.py imports, so a trial's start-up costs what a recorded one's did.
import record

HERE = Path(__file__).resolve().parent
LIVE_ARMS = ("tpe", "nsga2", "random", "constraints", "mo-asha")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["mo-asha", "nsga2"], choices=LIVE_ARMS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget-share", type=float, default=0.1,
                   help="share of the replay's budget each study spends")
    p.add_argument("--budget-trials", type=float, default=40.0,
                   help="the replay's budget: this many full trials' device-seconds")
    p.add_argument("--jobs", type=int, default=1, help="studies at once, one process each")
    p.add_argument("--core-per-job", action="store_true",
                   help="pin each study to a core of its own, with a device lock of its own")
    p.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    p.add_argument("--space", type=Path, default=HERE / "space.toml")
    p.add_argument("--plan", type=Path, default=HERE / "configs.json")
    p.add_argument("--out-dir", type=Path, default=HERE / "confirm")
    p.add_argument("--cache", type=Path, default=record.CACHE, help="feature network cache")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.budget_trials <= 0 or args.budget_share <= 0:
        p.error("--seeds, --jobs, --budget-trials and --budget-share must be positive")
    if args.core_per_job and args.jobs > len(os.sched_getaffinity(0)):
        p.error(f"--core-per-job: --jobs {args.jobs} is more than the "
                f"{len(os.sched_getaffinity(0))} cores this process may use")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Heavyweight (optuna, search): imported here, not by the trial processes.
    import live
    from recorded import TableError, load_table

    from search.space_toml import SpaceError

    try:
        recorded = load_table(args.results, args.space, args.plan)
        plan = {**record.load_plan(args.plan), "limits": recorded.limits}
    except (TableError, SpaceError, record.PlanError, OSError) as err:
        print(f"confirm: {err}", file=sys.stderr)
        return 2
    start = time.time()
    budget = args.budget_share * args.budget_trials * recorded.full_cost()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [{"arm": arm, "seed": seed, "budget": budget, "space": recorded.space,
             "plan": plan, "out_dir": args.out_dir}
            for seed in range(args.seeds) for arm in args.arms]
    print(f"{len(jobs)} studies, {budget:.0f} device-s each, {args.jobs} at a time", flush=True)
    data = record.payload(plan["data"], args.cache)
    results = live.run_studies(jobs, data, args.jobs, args.core_per_job)
    doc = live.summarise(results, recorded, budget)
    command = "python benchmarks/searchbench/confirm.py " + " ".join(argv or sys.argv[1:])
    text = live.markdown(doc, command.strip(), time.time() - start)
    (args.out_dir / "summary.md").write_text(text)
    (args.out_dir / "summary.json").write_text(live.dumps(doc))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
