"""The trial pipeline's state and plug points.

A trial in flight is a :class:`Flight`: its stage records so far and where it is
(:class:`Phase`). The stages (:mod:`search.run.stages`) share a :class:`Context`: the study,
its space, the workers, the pruner, the hooks and the retry queue. A :class:`Hook` plugs a
feature into the stages: it may predict a candidate's latency before dispatch, convert a
measurement to the target device, mutate the front, stop a trial to grow or shrink it.
The stages know none of these features; they call every hook of a :class:`Hooks` in
order at each plug point. The hooks of diffnas are :class:`search.hooks.hardware.HardwareHook`,
:class:`search.hooks.evolution.EvolutionHook` and :class:`search.hooks.adapt.AdaptHook`.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore

from engine.config import Config
from search.pruning.base import Cost, Pruner
from search.run.pool import Worker, WorkerPool
from search.space import SearchSpace
from search.storage import artifacts
from search.storage import record as rec
from workers.records import Decision, Measurement, RungReport, TrialOutcome, TrialRequest


class Phase(enum.Enum):
    """Where a trial in flight is; its end states are Optuna's COMPLETE, PRUNED and FAIL."""

    QUEUED = "queued"  # asked (or to be retried), waiting for an idle worker
    STARTING = "starting"  # dispatched; its process is not up yet
    MEASURING = "measuring"  # latency and memory
    TRAINING = "training"  # between rungs
    EVALUATING = "evaluating"  # FID/KID, grid, checkpoint


@dataclass(frozen=True)
class Current:
    """The attempt a worker runs now: set exactly while a worker has the trial."""

    worker: str
    started: float
    pid: int | None = None


@dataclass
class Flight:
    """A trial from its ask to its tell: the stage records so far, and where it is."""

    trial: optuna.Trial
    config: Config  # as asked; a step budget replaces its schedule once measured
    cost: Cost
    asked_at: float = field(default_factory=time.time)
    phase: Phase = Phase.QUEUED
    attempt: int = 0
    current: Current | None = None
    attempts: tuple[rec.Attempt, ...] = ()
    rungs: tuple[rec.Rung, ...] = ()
    measurement: Measurement | None = None  # the latest attempt's, in target-device terms
    conversion: rec.Conversion | None = None  # how that latency was converted
    avoid: frozenset[str] = frozenset()  # workers a retry should not go back to
    overhead_s: float = 0.0  # coordinator time spent on this trial
    result_at: float = 0.0  # time.perf_counter() when the attempt's outcome arrived

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass
class Tally:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)


@dataclass
class Context:
    """What the stages share: the study, its space, the workers, the pruner and the hooks,
    the trials in flight and the retry queue."""

    study: optuna.Study
    space: SearchSpace
    pool: WorkerPool
    pruner: Pruner
    hooks: Hooks
    data_ref: Any
    channels: int
    results: Path
    limits: dict[str, float]
    max_retries: int = 2
    latency_target_ms: float | None = None
    say: Callable[[str], None] = print
    flights: dict[int, Flight] = field(default_factory=dict)
    queue: collections.deque[Flight] = field(default_factory=collections.deque)
    tally: Tally = field(default_factory=Tally)
    told: int = 0  # bumped at every tell, so the loop knows when to re-read the storage

    def __post_init__(self) -> None:
        self.store: FileSystemArtifactStore = artifacts.artifact_store(self.results)
        self.distributions = self.space.distributions()


class Hook:
    """A feature that plugs into the pipeline; every method defaults to doing nothing."""

    def ready(self, ctx: Context) -> bool:
        """Whether new trials may be dispatched now (called once per loop turn)."""
        return True

    def before_ask(self, ctx: Context) -> None:
        """Just before the sampler is asked (a hook may enqueue a trial for it)."""

    def on_asked(self, ctx: Context, trial: optuna.Trial, config: Config, cost: Cost) -> Cost:
        """A candidate was decoded; return its pre-screen cost, amended."""
        return cost

    def on_dispatch(self, ctx: Context, flight: Flight, worker: Worker,
                    request: TrialRequest) -> TrialRequest:
        """The request about to go to ``worker``; return it, amended."""
        return request

    def on_measured(self, ctx: Context, flight: Flight, worker: Worker, m: Measurement
                    ) -> Measurement:
        """The worker measured the trial; return the measurement the study records."""
        return m

    def on_rung(self, ctx: Context, flight: Flight, rung: RungReport, decision: Decision
                ) -> Decision:
        """The pruner answered a rung before the last; return the final answer."""
        return decision

    def on_result(self, ctx: Context, flight: Flight, outcome: TrialOutcome,
                  worker: Worker | None) -> None:
        """An attempt ended with ``outcome`` (any status)."""

    def on_stopped(self, ctx: Context, flight: Flight, outcome: TrialOutcome) -> str:
        """The trial is about to be told PRUNED or FAIL; return text for its reason."""
        return ""

    def on_retry(self, ctx: Context, flight: Flight) -> None:
        """The trial goes back to the queue for another attempt."""


class Hooks(Hook):
    """Several hooks, called in order; a value one returns is what the next one sees."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = tuple(hooks)

    def ready(self, ctx: Context) -> bool:
        return all([h.ready(ctx) for h in self.hooks])  # noqa: C419 (every hook sees the turn)

    def before_ask(self, ctx: Context) -> None:
        for h in self.hooks:
            h.before_ask(ctx)

    def on_asked(self, ctx: Context, trial: optuna.Trial, config: Config, cost: Cost) -> Cost:
        for h in self.hooks:
            cost = h.on_asked(ctx, trial, config, cost)
        return cost

    def on_dispatch(self, ctx: Context, flight: Flight, worker: Worker,
                    request: TrialRequest) -> TrialRequest:
        for h in self.hooks:
            request = h.on_dispatch(ctx, flight, worker, request)
        return request

    def on_measured(self, ctx: Context, flight: Flight, worker: Worker, m: Measurement
                    ) -> Measurement:
        for h in self.hooks:
            m = h.on_measured(ctx, flight, worker, m)
        return m

    def on_rung(self, ctx: Context, flight: Flight, rung: RungReport, decision: Decision
                ) -> Decision:
        for h in self.hooks:
            decision = h.on_rung(ctx, flight, rung, decision)
        return decision

    def on_result(self, ctx: Context, flight: Flight, outcome: TrialOutcome,
                  worker: Worker | None) -> None:
        for h in self.hooks:
            h.on_result(ctx, flight, outcome, worker)

    def on_stopped(self, ctx: Context, flight: Flight, outcome: TrialOutcome) -> str:
        return "".join(h.on_stopped(ctx, flight, outcome) for h in self.hooks)

    def on_retry(self, ctx: Context, flight: Flight) -> None:
        for h in self.hooks:
            h.on_retry(ctx, flight)
