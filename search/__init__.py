"""diffnas search: the coordinator of a multi-objective architecture search.

Search space (TOML) -> Optuna study -> ask/dispatch/tell over Ray workers -> Pareto reports.
``run_search`` and its option/result records load Ray on first use, so the reporting
verbs (status, pareto, export) start without it.
"""

from typing import Any

import workers  # noqa: F401  (sets Ray's environment defaults before ray is imported)
from search.pareto import hypervolume, non_dominated_sort, pareto_mask
from search.pruning.base import Pruner
from search.pruning.registry import PRUNERS, make_pruner
from search.space import SearchSpace, load_space, parse_space, presets
from search.space_toml import SpaceError
from search.storage.study import StudyError

_LAZY = {"SearchOptions", "SearchResult", "run_search"}

__all__ = [
    "PRUNERS",
    "Pruner",
    "SearchOptions",
    "SearchResult",
    "SearchSpace",
    "SpaceError",
    "StudyError",
    "hypervolume",
    "load_space",
    "make_pruner",
    "non_dominated_sort",
    "pareto_mask",
    "parse_space",
    "presets",
    "run_search",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from search.run import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
