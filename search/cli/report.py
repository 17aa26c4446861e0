"""``diffnas report STUDY``: the study as one self-contained HTML file (search/html/)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from search.cli.common import open_study, storage_args
from search.html import write_report
from search.storage import paths


def _cmd_report(args: argparse.Namespace) -> int:
    if args.out is not None:
        paths.check_file(args.out, "--out")
    study = open_study(args)
    started = time.perf_counter()
    out = write_report(study, args.results, args.out or args.results / args.study / "report.html")
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def register(subparsers: Any) -> None:
    """Add ``report`` to ``subparsers``."""
    p = subparsers.add_parser("report", help="the study as one self-contained HTML file "
                              "(front, learning curves, the run, a trial table)")
    p.add_argument("study")
    p.add_argument("--out", type=Path,
                   help="HTML file to write (default: results/<study>/report.html)")
    storage_args(p)
    p.set_defaults(func=_cmd_report)
