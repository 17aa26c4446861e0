"""What the study verbs share: where the storage is, and opening a study by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from search.storage import study as st

RESULTS = Path("results")


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
    """
    st.check_name(args.study)
    url = args.storage or st.default_storage(args.results)
    return st.load_existing(st.open_storage(url, create=False), args.study)
