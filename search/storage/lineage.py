"""Links between trials, as the study stores them: a mutation's parent, an adaptation (both
sides), a re-queue. Read from a live trial too (:func:`lineage_of`), before it is told.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial

from search.storage.doc import Doc, maybe

PARENT, MUTATION = "parent", "mutation"
ADAPTATION, ADAPTED_INTO = "adaptation", "adapted_into"
REQUEUED, REQUEUED_FROM = "requeued", "requeued_from"


@dataclass(frozen=True)
class Adaptation(Doc):
    """A child trial grown or shrunk from a running one (search.hooks.adapt)."""

    KEY: ClassVar[str] = ADAPTATION
    trigger: str
    reason: str
    parent: int
    at_step: int
    steps: int
    depth: int = 1
    predicted_latency_ms: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptedInto(Doc):
    """The parent's side of an adaptation: the trial it continues as, and the change."""

    KEY: ClassVar[str] = ADAPTED_INTO
    trial: int
    trigger: str
    change: str
    predicted_latency_ms: float | None = None
    unet: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    """Links between trials: a mutation's parent, an adaptation, a re-queue."""

    parent: int | None = None
    mutation: str = ""
    adaptation: Adaptation | None = None
    adapted_into: AdaptedInto | None = None
    requeued_from: int | None = None
    requeued: bool = False

    KEYS: ClassVar[dict[str, str]] = {
        "parent": PARENT, "mutation": MUTATION, "adaptation": ADAPTATION,
        "adapted_into": ADAPTED_INTO, "requeued_from": REQUEUED_FROM, "requeued": REQUEUED}

    def carried(self) -> Lineage:
        """What a re-queued trial keeps of this lineage: the parent, mutation, adaptation."""
        return replace(self, adapted_into=None, requeued_from=None, requeued=False)

    @property
    def depth(self) -> int:
        """How many adaptations made this trial (0: sampled or mutated)."""
        return self.adaptation.depth if self.adaptation else 0


def lineage_of(trial: optuna.Trial | FrozenTrial) -> Lineage:
    """The lineage of a trial, live (before it is told) or stored."""
    return read_lineage(trial.user_attrs)


def read_lineage(a: Mapping[str, Any]) -> Lineage:
    """The lineage in a trial's user attributes (a live trial's too, before it is told)."""
    return Lineage(parent=a.get(PARENT), mutation=a.get(MUTATION, ""),
                   adaptation=maybe(Adaptation, a.get(ADAPTATION)),
                   adapted_into=maybe(AdaptedInto, a.get(ADAPTED_INTO)),
                   requeued_from=a.get(REQUEUED_FROM), requeued=bool(a.get(REQUEUED)))
