"""The pruners by name: what ``--pruner`` and ``[study] pruner`` choose from."""

from __future__ import annotations

from collections.abc import Callable

from search.pruning.base import ConstraintPruner, NoPruner, Pruner
from search.pruning.mo_asha import MoAshaPruner
from search.space import SearchSpace

PRUNERS: dict[str, Callable[[SearchSpace], Pruner]] = {
    "none": NoPruner, "constraints": ConstraintPruner, "mo-asha": MoAshaPruner}


def make_pruner(name: str, space: SearchSpace) -> Pruner:
    """The pruner registered as ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones, or a space the pruner
            cannot work with (``mo-asha`` needs ``[rungs] min_steps > 0``).
    """
    try:
        factory = PRUNERS[name]
    except KeyError:
        raise ValueError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})") from None
    return factory(space)
