"""``diffnas legibility STUDY``: does the best front trial draw digits a person can read?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.data.images import save_grid
from search.cli.common import non_negative_int, open_study, positive_int, storage_args
from search.legibility import study_legibility
from search.storage import paths

GRID = 100  # samples in the written grid: 10 x 10


def _cmd_legibility(args: argparse.Namespace) -> int:
    if args.png is not None:
        paths.check_file(args.png, "--png")
    scores, samples = study_legibility(open_study(args), args.trial, args.n, args.seed)
    print(f"study {args.study}, " + "\n".join(scores.lines()))
    if args.png is not None:
        save_grid(samples[:GRID], args.png, nrow=10)
        print(f"wrote {args.png}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``legibility`` to ``subparsers``."""
    p = subparsers.add_parser(
        "legibility", help="share of the best front trial's samples (lowest FID) that the "
        "digits classifier reads with confidence >= 0.9, beside real digits")
    p.add_argument("study")
    p.add_argument("--trial", help="score this trial (3) or derived point (d0) instead")
    p.add_argument("--n", type=positive_int, default=500, help="samples, and real digits")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--png", type=Path, help="write a 10x10 grid of the samples here")
    storage_args(p)
    p.set_defaults(func=_cmd_legibility)
