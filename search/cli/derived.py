"""The verbs that derive a new Pareto point from a study trial: distill, compress, schedule.

Each parses its arguments and calls :mod:`search.derived.operations`. An operation that produces
nothing better (every distillation stage or compression level failed its gate) records
nothing and exits 1; bad input exits 2 with one line, as everywhere.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from search.cli.common import (
    non_negative_int,
    number,
    open_study,
    positive_float,
    positive_int,
    storage_args,
)
from search.derived import points as dv
from search.derived.operations import compress_trial, distill_trial, schedule_trial


def _open_source(args: argparse.Namespace) -> dv.Source:
    return dv.source(open_study(args), str(args.trial))


def _cmd_distill(args: argparse.Namespace) -> int:
    label, _ = distill_trial(_open_source(args), args.method, args.steps, args.results,
                                  args.teacher_steps, args.max_fid_ratio, args.retries,
                                  args.train_steps, args.batch_size)
    if label is None:
        print(f"no stage passed its gate (FID <= {args.max_fid_ratio:g} x the previous stage); "
              "nothing recorded", file=sys.stderr)
        return 1
    return 0


def _percent(text: str) -> float:
    """``5%`` or ``0.05`` -> 0.05."""
    try:
        value = number(text.removesuffix("%")) / (100.0 if text.endswith("%") else 1.0)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _cmd_compress(args: argparse.Namespace) -> int:
    methods = tuple(args.methods.split(",")) if args.methods else None
    label, _ = compress_trial(_open_source(args), args.max_fid_increase, args.results, methods,
                              args.finetune_steps)
    if label is None:
        print(f"no compression level kept FID within +{args.max_fid_increase:.1%}; nothing "
              "recorded", file=sys.stderr)
        return 1
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    schedule_trial(_open_source(args), args.steps, args.results, args.sampler, args.seconds,
                   args.seed, args.batch)
    return 0


# -- the parser --------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``distill``, ``compress`` and ``schedule`` to ``subparsers``."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("study")
        p.add_argument("trial", help="trial number (3), or a derived point (d0)")
        storage_args(p)

    p = subparsers.add_parser("distill", help="distil a trial to fewer sampling steps; the "
                              "student joins the Pareto front")
    common(p)
    p.add_argument("--method", choices=["progressive", "consistency"], default="progressive")
    p.add_argument("--steps", type=positive_int, default=4, help="target sampling steps")
    p.add_argument("--teacher-steps", type=positive_int, default=64,
                   help="the teacher's DDIM steps (progressive: steps x a power of 2)")
    p.add_argument("--max-fid-ratio", type=positive_float, default=1.10,
                   help="quality gate: a stage passes at FID <= this x the previous stage's")
    p.add_argument("--retries", type=non_negative_int, default=2, help="retries of a failing stage")
    p.add_argument("--train-steps", type=positive_int, help="training steps per stage")
    p.add_argument("--batch-size", type=positive_int, help="training batch per stage")
    p.set_defaults(func=_cmd_distill)

    p = subparsers.add_parser("compress", help="compress a trial within an FID tolerance; the "
                              "result joins the Pareto front")
    common(p)
    p.add_argument("--max-fid-increase", type=_percent, default=0.05,
                   help="largest accepted FID increase, e.g. 5%% (default) or 0.05")
    p.add_argument("--methods", help="comma-separated subset of prune,quantize,cast (default: "
                   "all, mild to aggressive)")
    p.add_argument("--finetune-steps", type=non_negative_int, default=100,
                   help="training steps after each pruning level")
    p.set_defaults(func=_cmd_compress)

    p = subparsers.add_parser("schedule", help="optimise a trial's timestep schedule for K "
                              "steps; the tuned model joins the Pareto front")
    common(p)
    p.add_argument("--steps", type=positive_int, required=True, help="sampling steps K")
    p.add_argument("--sampler", help="sampler to tune for (default: the trial's)")
    p.add_argument("--seconds", type=positive_float, default=60.0, help="optimiser time limit")
    p.add_argument("--seed", type=non_negative_int, default=0, help="noise and optimiser seed")
    p.add_argument("--batch", type=positive_int, default=64, help="validation noise batch")
    p.set_defaults(func=_cmd_schedule)

