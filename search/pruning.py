"""Pluggable multi-objective pruners, consulted by the coordinator at three stages.

Optuna's ``Trial.report``/``should_prune`` raise in multi-objective studies, so pruning
lives here. A pruner answers with a :class:`workers.Decision` at:

- stage 0, :meth:`Pruner.prescreen`: the free analytic cost, before any device time;
- stage 1, :meth:`Pruner.on_measured`: measured latency and peak memory, before training;
- stage 2, :meth:`Pruner.on_rung`: the quality proxy at each rung of training.

Every decision and its reason are persisted with the trial by the coordinator, and
:meth:`Pruner.restore` rebuilds a pruner's history from the stored trials on resume.
Pruners are chosen by name from :data:`PRUNERS` (the CLI and the space file's
``[study] pruner``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from optuna.trial import FrozenTrial

from search.space import SearchSpace
from workers.records import Decision, Measurement, RungReport


@dataclass(frozen=True)
class Cost:
    """Stage-0 numbers, computed without device time."""

    params: int
    flops: int


class Pruner(Protocol):
    """Decides, per trial and stage, whether to continue; see the module docstring."""

    name: str

    def restore(self, trials: Sequence[FrozenTrial]) -> None:
        """Reload history (rung reports, decisions) from the stored trials."""

    def prescreen(self, number: int, cost: Cost) -> Decision:
        """Stage 0: before the trial is dispatched."""

    def on_measured(self, number: int, measurement: Measurement) -> Decision:
        """Stage 1: latency and memory are known, training has not started."""

    def on_rung(self, number: int, rung: RungReport, measurement: Measurement | None
                ) -> Decision:
        """Stage 2: the trial reached a rung; answer within the call (never wait for others)."""


class NoPruner:
    """Never prunes: every trial trains to the end and is evaluated."""

    name = "none"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def restore(self, trials: Sequence[FrozenTrial]) -> None:
        pass

    def prescreen(self, number: int, cost: Cost) -> Decision:
        return Decision()

    def on_measured(self, number: int, measurement: Measurement) -> Decision:
        return Decision()

    def on_rung(self, number: int, rung: RungReport, measurement: Measurement | None
                ) -> Decision:
        return Decision()


PRUNERS: dict[str, Callable[[SearchSpace], Pruner]] = {"none": NoPruner}


def make_pruner(name: str, space: SearchSpace) -> Pruner:
    """The pruner registered as ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    try:
        factory = PRUNERS[name]
    except KeyError:
        raise ValueError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})") from None
    return factory(space)
