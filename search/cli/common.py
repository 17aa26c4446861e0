"""What the verbs share: a parser whose errors are one line, number types for its flags,
where the storage is, and opening a study by name."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import optuna

from search.storage import paths
from search.storage import study as st

RESULTS = Path("results")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"diffnas: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def storage_args(p: argparse.ArgumentParser) -> None:
    """``--storage`` and ``--results``, as every study verb takes them."""
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite under --results)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="output folder: storage and per-trial artifacts (default: results)")


def open_study(args: argparse.Namespace) -> optuna.Study:
    """The existing study ``args.study`` in ``args.storage`` (default: under ``--results``).

    Raises:
        StudyError: a study name that could leave ``--results``, a missing or damaged
            storage, or no such study.
        PathError: ``--results`` is a file, or under one.
    """
    st.check_name(args.study)
    paths.check_dir(args.results, "--results")
    url = args.storage or st.default_storage(args.results)
    return st.load_existing(st.open_storage(url, create=False), args.study)
