"""Pluggable multi-objective pruners, consulted by the coordinator at three stages.

Optuna's ``Trial.report``/``should_prune`` raise in multi-objective studies, so pruning
lives here. A pruner answers with a :class:`workers.Decision` at:

- stage 0, :meth:`Pruner.prescreen`: the free analytic cost and the latency predicted
  from the target device's table (:mod:`search.hooks.hardware`), before any device time;
- stage 1, :meth:`Pruner.on_measured`: measured latency and peak memory, before training;
- stage 2, :meth:`Pruner.on_rung`: the quality proxy at each rung of training.

Every decision and its reason are persisted with the trial by the coordinator, and
:meth:`Pruner.restore` rebuilds a pruner's history from the stored trials on resume.
Pruners are chosen by name from :data:`search.pruning.registry.PRUNERS` (the CLI and the space
file's ``[study] pruner``):

- ``none``: never prunes;
- ``constraints``: stages 0 and 1 against the space's ``[constraints]`` (a violating
  candidate stops before it costs device time, or right after its measurement);
- ``mo-asha``: the constraint stages, then rung-based multi-objective successive halving
  (:mod:`search.pruning.mo_asha`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from optuna.trial import FrozenTrial

from engine.config import Config
from search.space import SearchSpace
from workers.records import Decision, Measurement, RungReport


@dataclass(frozen=True)
class Cost:
    """Stage-0 numbers, computed without device time (``train_steps``: 0 if unknown).

    ``predicted_latency_ms`` is the sampling latency predicted on ``target_device`` (None:
    no latency table could predict it). ``proxy_group`` names the trials whose validation
    losses compare (:func:`proxy_group`; empty: compare with every trial).
    """

    params: int
    flops: int
    train_steps: int = 0
    predicted_latency_ms: float | None = None
    target_device: str = ""
    proxy_group: str = ""


PROXY_BLIND = ("prediction", "beta_schedule", "sampler")
"""The schedule fields that set the validation loss's scale or that it cannot see."""


def proxy_group(config: Config) -> str:
    """The trials whose validation losses rank their final quality: those that share the
    prediction target, the noise schedule and the sampler.

    An eps loss and a v loss differ in scale (v's is about twice eps's on ``digits``, yet v
    trials reach the lower FID), the noise schedule weights the loss differently, and the
    sampler decides the FID without touching the loss. Across these, a lower loss says
    nothing about a lower FID.
    """
    return "/".join(str(getattr(config.schedule, name)) for name in PROXY_BLIND)


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


# -- constraints (stages 0 and 1) --------------------------------------------------------

STAGE0 = ("params", "flops")  # known before dispatch (engine.model.cost)
STAGE1 = ("latency_ms", "memory_mb")  # measured by the worker before training
UNITS = {"params": "", "flops": " FLOPs", "latency_ms": " ms", "memory_mb": " MB"}


def constraint_values(known: Mapping[str, float], limits: Mapping[str, float]
                      ) -> dict[str, float]:
    """``value / limit - 1`` for every limit whose value is known; > 0 violates.

    These are what ``trial.set_constraint`` records, so that TPE ranks infeasible trials
    by how far they violate (Optuna 5).
    """
    return {name: float(known[name]) / limit - 1.0 for name, limit in limits.items()
            if name in known}


def stage0_values(cost: Cost) -> dict[str, float]:
    """What is known before dispatch; the predicted latency stands in for the measured one
    until the trial measures it."""
    values = {"params": float(cost.params), "flops": float(cost.flops)}
    if cost.predicted_latency_ms is not None:
        values["latency_ms"] = cost.predicted_latency_ms
    return values


def stage1_values(measurement: Measurement, memory: str) -> dict[str, float]:
    return {"latency_ms": measurement.latency_ms, "memory_mb": measurement.memory_mb(memory)}


def _fmt(value: float) -> str:
    return f"{int(value):,}" if value >= 1000 and value == int(value) else f"{value:.4g}"


def _verdict(stage: int, known: Mapping[str, float], limits: Mapping[str, float]) -> Decision:
    """Prune on the first violated limit, naming the value, the limit and the excess."""
    values = constraint_values(known, limits)
    over = [name for name, v in values.items() if v > 0]
    if not over:
        return Decision()
    parts = [f"{n} {_fmt(known[n])}{UNITS.get(n, '')} over the limit {_fmt(limits[n])} "
             f"(+{values[n]:.1%})" for n in over]
    return Decision(False, f"constraints stage {stage}: " + "; ".join(parts))


class ConstraintPruner:
    """Stops a candidate that violates a hard limit of ``[constraints]`` as early as known.

    Stage 0 checks ``max_params`` and ``max_flops`` before any device time, and the
    predicted latency against ``max_latency_ms`` once it is over by more than
    ``latency_margin``; stage 1 checks the measured ``max_latency_ms`` and ``max_memory_mb``
    (the memory the space's ``[evaluate] memory`` names) before training. The coordinator
    records the constraint values of every trial.
    """

    name = "constraints"

    def __init__(self, space: SearchSpace) -> None:
        limits = space.constraints.limits()
        self.stage0 = {k: v for k, v in limits.items() if k in STAGE0}
        self.stage1 = {k: v for k, v in limits.items() if k in STAGE1}
        self.memory = space.evaluate.memory
        self.latency_limit = limits.get("latency_ms")
        self.margin = space.constraints.latency_margin

    def restore(self, trials: Sequence[FrozenTrial]) -> None:
        pass  # stateless

    def prescreen(self, number: int, cost: Cost) -> Decision:
        decision = _verdict(0, stage0_values(cost), self.stage0)
        predicted, limit = cost.predicted_latency_ms, self.latency_limit
        if (not decision.proceed or predicted is None or limit is None
                or predicted <= limit * (1 + self.margin)):
            return decision
        return Decision(False, f"constraints stage 0: predicted latency {predicted:.4g} ms on "
                               f"{cost.target_device} over the limit {_fmt(limit)} ms + "
                               f"{self.margin:.0%} margin (+{predicted / limit - 1:.1%})")

    def on_measured(self, number: int, measurement: Measurement) -> Decision:
        return _verdict(1, stage1_values(measurement, self.memory), self.stage1)

    def on_rung(self, number: int, rung: RungReport, measurement: Measurement | None
                ) -> Decision:
        return Decision()
