"""The study verbs of ``diffnas``: search, status, pareto, export, workers.

``register(subparsers)`` adds them to the main parser (``search/cli/__init__.py``); each handler
parses nothing itself and delegates to the ``search`` modules. User errors are
``ValueError`` subclasses with one-line messages, which the CLI prints and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import workers  # noqa: F401  (Ray's environment defaults, before ray is imported)
from search import plot, report, report_trial, rows
from search.cli.common import (
    non_negative_int,
    number,
    open_study,
    positive_float,
    positive_int,
    storage_args,
)
from search.derived.operations import distill_front
from search.derived.points import companion, source
from search.run import progress
from search.storage import paths
from search.storage import study as st
from search.storage.artifacts import export_trial


def _cmd_search(args: argparse.Namespace) -> int:
    from search.run.cluster import native_output_to  # loads Ray: the reports need not
    from search.run.runner import SearchOptions, run_search

    options = SearchOptions(
        space=args.space or args.preset, study=args.study, storage=args.storage,
        results=args.results, trials=args.trials, workers=args.workers, address=args.address,
        insecure=args.insecure, sampler=args.sampler, seed=args.seed, pruner=args.pruner,
        max_retries=args.max_retries, timeout_s=args.timeout,
        max_latency_ms=args.max_latency_ms)
    if options.space is None and options.study is None:
        options = SearchOptions(**{**options.__dict__, "space": "demo"})
    with native_output_to(_ray_log()):  # Ray's C++ warnings and dumps
        result = run_search(options, progress.for_stream(sys.stderr))
    study = st.load_existing(st.open_storage(result.storage, create=False), result.study)
    front = report.front(study, st.stored_space(study))
    png = plot.plot_front(front, result.results / result.study / "pareto.png", result.study)
    print(f"study {result.study}: {result.finished}/{result.target} finished (complete "
          f"{result.complete}, pruned {result.pruned}, failed {result.failed}) in "
          f"{result.wall_s:.0f} s" + (" (resumed)" if result.resumed else ""))
    print(report.pareto_text(front))
    print(f"plot: {png.resolve()}\nartifacts: {(result.results / result.study).resolve()}/"
          f"trial-<n>/\ndashboard: "
          f"{report.dashboard_command(result.storage, result.results / 'artifacts')}")
    if args.distill_front:
        done = distill_front(study, args.distill_front, args.distill_method, args.distill_steps,
                             result.results)
        print(f"distilled {sum(new is not None for _, new in done)} of {len(done)} front "
              "trials:\n" + report.pareto_text(report.front(study, st.stored_space(study))))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    study = open_study(args)
    if args.json and args.trial is None:
        raise ValueError("--json: give --trial N (the raw record of one trial)")
    if args.trial is None:
        print(report.status_text(study))
    else:
        print((report_trial.trial_json if args.json else report_trial.trial_text)(study, args.trial))
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    if args.plot is not None:
        paths.check_file(args.plot, "--plot")
    study = open_study(args)
    front = report.front(study, st.stored_space(study), args.reference)
    if args.json or args.csv:  # machine-readable: nothing else on stdout
        doc = rows.document(study, front, args.all)
        sys.stdout.write(rows.to_json(doc) + "\n" if args.json else rows.to_csv(doc["rows"]))
        return 0
    if args.all:
        raise ValueError("--all: give --json or --csv (the table shows the front)")
    print(report.pareto_text(front))
    if front.trials:
        png = args.plot or args.results / args.study / "pareto.png"
        print(f"plot: {plot.plot_front(front, Path(png), args.study)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    paths.check_dir(args.out, "--out")
    study = open_study(args)
    src = source(study, str(args.trial))  # a trial (3) or a derived point (d0)
    holder = companion(study) if src.label.startswith("d") else study
    assert holder is not None  # source() found the derived point in it
    out = export_trial(holder, src.trial.number, args.out)
    print(f"exported trial {args.trial} to {out} (sample with: diffnas sample {out})")
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    from search.run.pool import workers_text  # loads Ray: the reports need not

    print(workers_text(args.address, args.insecure))
    return 0


def _ray_log() -> Path:
    """Where Ray's own output of this process goes: beside Ray's session logs."""
    return Path(tempfile.gettempdir()) / "ray" / f"diffnas-search-{os.getpid()}.log"


def _reference(text: str) -> tuple[float, ...]:
    try:
        values = tuple(number(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not finite numbers: {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError("needs 3 values: fid,latency_ms,peak_mem_mb")
    if min(values) <= 0:  # every objective is positive; a point at or below 0 bounds nothing
        raise argparse.ArgumentTypeError(f"values must be > 0, got {text!r}")
    return values


def register(subparsers: Any) -> None:
    """Add ``search``, ``status``, ``pareto``, ``export`` and ``workers`` to ``subparsers``."""
    p = subparsers.add_parser("search", help="run a search, or resume one (same command)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", help="a shipped space: smoke, demo, mac (default: demo)")
    which.add_argument("--space", help="a search-space TOML file (see search/presets/)")
    p.add_argument("--study", help="study name (default: the space's name); an existing "
                   "study is resumed")
    storage_args(p)
    p.add_argument("--trials", type=positive_int, help="target count of finished trials")
    p.add_argument("--workers", type=positive_int, help="at most this many workers "
                   "(embedded Ray: this many; default one per core, one on a Mac)")
    p.add_argument("--address", help="join this Ray cluster (HOST:PORT of `ray start --head`) "
                   "instead of starting one on loopback; it must require token "
                   "authentication (README, 'A cluster of machines')")
    p.add_argument("--insecure", action="store_true", help="with --address: join a cluster "
                   "that does not require token authentication")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], help="new studies only")
    p.add_argument("--seed", type=non_negative_int, help="sampler seed (new studies only)")
    p.add_argument("--pruner", help="none | constraints | mo-asha (default: the space's "
                   "[study] pruner); may differ on resume")
    p.add_argument("--max-retries", type=non_negative_int, default=2,
                   help="retries of a trial whose process or worker died")
    p.add_argument("--timeout", type=positive_float,
                   help="seconds; then stop asking for new trials")
    p.add_argument("--distill-front", type=non_negative_int, default=0, metavar="K",
                   help="when the search ends, distil the K non-dominated trials of lowest "
                   "FID (see diffnas distill)")
    p.add_argument("--distill-method", choices=["progressive", "consistency"],
                   default="progressive", help="with --distill-front (default: progressive)")
    p.add_argument("--distill-steps", type=positive_int, default=4,
                   help="with --distill-front: target sampling steps (default: 4)")
    p.add_argument("--max-latency-ms", type=float,
                   help="sampling latency target (ms per image, batch 1): each trial's worker "
                   "measures one network evaluation on its device and samples with the most "
                   "steps that fit (overriding the space's sampler and steps; the adaptive "
                   "sampler keeps itself with that cap); a candidate that cannot fit one step "
                   "is infeasible")
    p.set_defaults(func=_cmd_search)

    p = subparsers.add_parser("status", help="trials by state, workers, ETA, reasons")
    p.add_argument("study")
    p.add_argument("--trial", help="explain one trial (3) or derived point (d0): decisions, "
                   "rungs, attempts, timings, lineage")
    p.add_argument("--json", action="store_true",
                   help="with --trial: the raw record as one JSON object")
    storage_args(p)
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("pareto", help="the non-dominated trials, hypervolume, plot")
    p.add_argument("study")
    p.add_argument("--plot", type=Path, help="PNG path (default: results/<study>/pareto.png)")
    p.add_argument("--reference", type=_reference,
                   help="hypervolume reference point fid,latency_ms,peak_mem_mb")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the rows as JSON (schema: "
                     "README, 'Machine-readable output')")
    fmt.add_argument("--csv", action="store_true", help="print the rows as CSV")
    p.add_argument("--all", action="store_true", help="with --json/--csv: every trial and "
                   "derived point, not only the front")
    storage_args(p)
    p.set_defaults(func=_cmd_pareto)

    p = subparsers.add_parser("export", help="copy a trial's weights, config and samples")
    p.add_argument("study")
    p.add_argument("trial", help="trial number (3), or a derived point (d0)")
    p.add_argument("--out", type=Path, required=True)
    storage_args(p)
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("workers", help="connected workers and their device profiles")
    p.add_argument("--address", default="auto", help="Ray cluster address HOST:PORT "
                   "(default: auto, the cluster `ray start` runs on this machine)")
    p.add_argument("--insecure", action="store_true",
                   help="join a cluster that does not require token authentication")
    p.set_defaults(func=_cmd_workers)
