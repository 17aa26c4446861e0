"""The trial record: every key the study stores for a trial, one frozen record per stage.

A trial's life leaves one record per stage in its Optuna user attributes, written once by
the coordinator and read back by the reports, the pruners, evolution, adaptation and the
derived points through :func:`read`. Each record round-trips through JSON (``to_doc`` /
``from_doc``) under one key; keys a record does not know are kept in ``extra`` so an older
or richer document survives a round trip.

=============  =================  ==================================================
key            record             stage
=============  =================  ==================================================
config         ``Config``         asked: the decoded candidate
cost           :class:`Prescreen`  pre-screen: parameters, FLOPs, predicted latency
measurement    :class:`Measured`   measured: latency (target-device terms), memory;
                                  again at the end if the latency was re-measured
latency        :class:`Conversion` measured: where the latency was measured, its ratio
step_budget    ``dict``           measured: the schedule a latency target chose
inheritance    ``dict``           measured: how the weights started (fresh, inherited)
rungs          :class:`Rung` list  rungs: the quality proxy and the pruner's answer
attempts       :class:`Attempt`    each attempt: worker, status, start and end
walltime       ``WallTime``       finish: where the last attempt's wall time went
(several)      :class:`Finished`   finish: quality, timings, artifacts, device, reason
(several)      ``Lineage``        mutation, adaptation and re-queue links
derived        :class:`Derived`    a derived point (distilled, compressed, tuned)
=============  =================  ==================================================

The links between trials are records of :mod:`search.storage.lineage`; the wall-time
records, with each worker's own costs, of :mod:`search.storage.timing`; the JSON form every
record shares, :mod:`search.storage.doc`.

The headline numbers are also stored flat (:class:`Headline`: scalars only), so that
optuna-dashboard can sort and filter trials by them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.config import Config, ScheduleConfig
from search.pruning.base import Cost
from search.storage.doc import Doc, maybe, plain
from search.storage.lineage import (
    AdaptedInto,
    Lineage,
    read_lineage,
)
from search.storage.timing import WALLTIME, read_walltime
from workers.records import OBJECTIVES, Decision, Measurement, WallTime

FORMAT = 2
"""Study format: 2 adds the flat headline attributes; format 1 studies read unchanged."""

CONFIG = "config"
PRESCREEN = "cost"
MEASURED = "measurement"
CONVERSION = "latency"
STEP_BUDGET = "step_budget"
INHERITANCE = "inheritance"
RUNGS = "rungs"
ATTEMPTS = "attempts"
REASON = "reason"
FEASIBLE = "feasible"
QUALITY, TIMINGS, ARTIFACTS, ARTIFACT_IDS = "quality", "timings", "artifacts", "artifact_ids"
DEVICE, WORKER, NODE, DEVICE_CLASS = "device", "worker", "node", "device_class"
DERIVED = "derived"
PREDICTED = "predicted_latency"  # format 1 only: now part of the pre-screen record


def _answer(decision: Decision) -> str:
    return "continue" if decision.proceed else "prune"


# -- the stage records ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prescreen(Doc):
    """Pre-screen, no device time: the analytic cost and the latency predicted on the target
    device class, and the pruner's answer."""

    KEY: ClassVar[str] = PRESCREEN
    params: int
    flops: int
    train_steps: int = 0
    predicted_latency_ms: float | None = None
    target_device: str = ""
    decision: str = "continue"
    reason: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def proceed(self) -> bool:
        return self.decision == "continue"


@dataclass(frozen=True)
class Conversion(Doc):
    """A latency measured on one device class, in the study's target-class terms."""

    KEY: ClassVar[str] = CONVERSION
    device_class: str
    target_device: str
    measured_ms: float
    latency_ms: float
    ratio: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Measured(Doc):
    """Measured before training: latency in target-device terms, peak memory, the answer.

    The latency's trust fields are those of :class:`workers.records.Measurement` (defaults:
    a record stored before they existed). A trial whose latency was disturbed and measured
    again at its end has this record written a second time, with ``latency_attempts``
    (both, in target terms) and the kept attempt's latency (:func:`remeasured`).
    """

    KEY: ClassVar[str] = MEASURED
    NESTED: ClassVar[Mapping[str, type[Doc]]] = {"measured_on": Conversion}
    latency_ms: float
    latency_spread: float = 0.0
    samples_ms: tuple[float, ...] = ()
    train_mb: float = 0.0
    sample_mb: float = 0.0
    seconds: float = 0.0
    budget: Mapping[str, Any] | None = None
    start: Mapping[str, Any] = field(default_factory=lambda: {"status": "fresh"})
    measured_on: Conversion | None = None
    decision: str = "continue"
    reason: str = ""
    latency_ci: float = 0.0
    latency_rounds: int = 1
    disturbed_rounds: int = 0
    reference_ratio: float = 1.0
    disturbed: bool = False
    latency_attempts: tuple[Mapping[str, Any], ...] = ()
    wait_share: float = 0.0
    reference_shift: float = 1.0
    host_slowdown: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def memory_mb(self, which: str) -> float:
        """The memory objective: ``sample``, ``train`` or ``max`` of the two."""
        return {"sample": self.sample_mb, "train": self.train_mb,
                "max": max(self.sample_mb, self.train_mb)}[which]


@dataclass(frozen=True)
class Rung(Doc):
    """One rung of one attempt: the quality proxy and the pruner's (or adaptation's) answer."""

    step: int
    val_loss: float
    train_loss: float = float("nan")
    elapsed_s: float = 0.0
    attempt: int = 0
    decision: str = "continue"  # continue | prune | adapt
    reason: str = ""
    # The validation points after the previous rung, up to this one: ``(step, val_loss)``
    # every ``eval_every`` steps (the learning curve between rungs).
    history: tuple[tuple[int, float], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Attempt(Doc):
    """One attempt at a trial on one worker (retries after a crash add more)."""

    attempt: int
    worker: str
    status: str
    reason: str
    started: float
    ended: float
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rungs:
    """Every rung so far, stored as one list."""

    KEY: ClassVar[str] = RUNGS
    items: tuple[Rung, ...]


@dataclass(frozen=True)
class Attempts:
    """Every attempt so far, stored as one list."""

    KEY: ClassVar[str] = ATTEMPTS
    items: tuple[Attempt, ...]


@dataclass(frozen=True)
class StepBudget:
    """The schedule a latency target chose on the worker, and why (the worker's document)."""

    KEY: ClassVar[str] = STEP_BUDGET
    doc: Mapping[str, Any]

    @property
    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(**self.doc["schedule"])


@dataclass(frozen=True)
class Inheritance:
    """How a mutation child's weights started: ``{"status": "inherited" | "fresh", ...}``."""

    KEY: ClassVar[str] = INHERITANCE
    doc: Mapping[str, Any]


@dataclass(frozen=True)
class Finished:
    """What a finished attempt left: who ran it, on what, how long, how good, which files.

    Every field is optional: a trial pruned before dispatch has only ``reason`` and
    ``feasible``.
    """

    reason: str = ""
    feasible: bool | None = None
    worker: str = ""
    node: Mapping[str, str] | None = None
    device: Mapping[str, Any] | None = None
    quality: Mapping[str, Any] | None = None
    timings: Mapping[str, float] | None = None
    artifacts: Mapping[str, str] | None = None
    artifact_ids: Mapping[str, str] | None = None
    device_class: str = ""  # the worker's (a flat attribute, for sorting)

    KEYS: ClassVar[dict[str, str]] = {
        "reason": REASON, "feasible": FEASIBLE, "worker": WORKER, "node": NODE,
        "device": DEVICE, "quality": QUALITY, "timings": TIMINGS, "artifacts": ARTIFACTS,
        "artifact_ids": ARTIFACT_IDS, "device_class": DEVICE_CLASS}


@dataclass(frozen=True)
class Derived(Doc):
    """A derived point: what was done (``kind``) to which trial (``source``), and its detail."""

    KEY: ClassVar[str] = DERIVED
    kind: str
    source: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """``progressive 4 steps of 3``-style description."""
        return f"{self.detail.get('what', self.kind)} of {self.source}"


# -- the whole trial -----------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """Everything stored for one trial, typed; :func:`read` builds it."""

    number: int
    state: TrialState
    values: tuple[float, ...] | None
    params: Mapping[str, Any]
    constraints: Mapping[str, float]
    asked_config: Config | None = None
    prescreen: Prescreen | None = None
    measured: Measured | None = None
    conversion: Conversion | None = None
    step_budget: StepBudget | None = None
    inheritance: Inheritance | None = None
    rungs: tuple[Rung, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    finished: Finished = Finished()
    lineage: Lineage = field(default_factory=Lineage)
    derived: Derived | None = None
    predicted: Mapping[str, Any] | None = None  # format 1's separate prediction
    walltime: WallTime | None = None  # absent in records stored before it existed

    @property
    def config(self) -> Config | None:
        """The config the trial ran: as asked, with the schedule a latency target chose."""
        if self.asked_config is None or self.step_budget is None:
            return self.asked_config
        return replace(self.asked_config, schedule=self.step_budget.schedule)

    @property
    def reason(self) -> str:
        return self.finished.reason

    @property
    def feasible(self) -> bool:
        """No recorded constraint is violated (a value > 0 is a violation)."""
        return all(v <= 0.0 for v in self.constraints.values())

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE and bool(self.values)

    def value(self, name: str) -> float | None:
        """One objective's value (``fid``, ``latency_ms``, ``peak_mem_mb``), None if unknown."""
        return float(self.values[OBJECTIVES.index(name)]) if self.values else None

    @property
    def predicted_latency_ms(self) -> float | None:
        if self.prescreen is not None and self.prescreen.predicted_latency_ms is not None:
            return self.prescreen.predicted_latency_ms
        return self.predicted.get("ms") if self.predicted else None

    def validation_points(self, attempt: int | None = None) -> dict[int, float]:
        """``{step: val_loss}`` of the rungs (of one attempt, if given)."""
        return {r.step: r.val_loss for r in self.rungs if attempt in (None, r.attempt)}


@dataclass(frozen=True)
class Headline:
    """A complete trial's headline numbers, stored as flat scalars (one attribute each), so
    that optuna-dashboard can sort and filter trials by them."""

    fid: float
    latency_ms: float
    peak_mem_mb: float
    fid_floor: float | None = None
    parent: int | None = None


Record = (Prescreen | Measured | Conversion | Rungs | Attempts | StepBudget | Inheritance
          | Finished | Lineage | AdaptedInto | Derived | Headline | Config | WallTime)


def attrs(*records: Record) -> dict[str, Any]:
    """The user attributes that store ``records`` (for ``enqueue_trial`` and ``create_trial``)."""
    out: dict[str, Any] = {}
    for rec in records:
        out.update(_attrs(rec))
    return out


def _attrs(rec: Record) -> dict[str, Any]:
    if isinstance(rec, Config):
        return {CONFIG: rec.to_dict()}
    if isinstance(rec, WallTime):
        return {WALLTIME: dataclasses.asdict(rec)}
    if isinstance(rec, (Rungs, Attempts)):
        return {rec.KEY: [r.to_doc() for r in rec.items]}
    if isinstance(rec, (StepBudget, Inheritance)):
        return {rec.KEY: dict(rec.doc)}
    if isinstance(rec, Headline):
        return {k: v for k, v in dataclasses.asdict(rec).items() if v is not None}
    if isinstance(rec, (Finished, Lineage)):
        return {key: plain(v) for name, key in rec.KEYS.items()
                if not _unset(v := getattr(rec, name))}
    return {rec.KEY: rec.to_doc()}


def _unset(value: Any) -> bool:
    """A field left at its empty default (None, "" or False; 0 is a value)."""
    return value is None or value is False or (isinstance(value, str) and not value)


def write(trial: optuna.Trial, *records: Record) -> None:
    """Store ``records`` on a live trial (the coordinator's, before it is told)."""
    for key, value in attrs(*records).items():
        trial.set_user_attr(key, value)


def headline(values: Sequence[float], finished: Finished, parent: int | None) -> Headline:
    """The headline of a trial told with ``values`` (in :data:`OBJECTIVES` order)."""
    floor = (finished.quality or {}).get("fid_floor")
    fid, latency, memory = (float(v) for v in values)
    return Headline(fid, latency, memory, None if floor is None else float(floor), parent)


def read(trial: FrozenTrial) -> TrialRecord:
    """Every stored record of ``trial`` (format 1 and 2 studies alike)."""
    a = trial.user_attrs
    return TrialRecord(
        number=trial.number, state=trial.state,
        values=tuple(trial.values) if trial.values else None, params=dict(trial.params),
        constraints=dict(trial.constraints),
        asked_config=Config.from_dict(a[CONFIG]) if CONFIG in a else None,
        prescreen=maybe(Prescreen, a.get(PRESCREEN)),
        measured=maybe(Measured, a.get(MEASURED)),
        conversion=maybe(Conversion, a.get(CONVERSION)),
        step_budget=StepBudget(a[STEP_BUDGET]) if STEP_BUDGET in a else None,
        inheritance=Inheritance(a[INHERITANCE]) if INHERITANCE in a else None,
        rungs=tuple(Rung.from_doc(r) for r in a.get(RUNGS, ())),
        attempts=tuple(Attempt.from_doc(r) for r in a.get(ATTEMPTS, ())),
        finished=Finished(**{name: a[key] for name, key in Finished.KEYS.items() if key in a}),
        lineage=read_lineage(a), derived=maybe(Derived, a.get(DERIVED)), predicted=a.get(PREDICTED),
        walltime=read_walltime(a.get(WALLTIME)))


def prescreen(cost: Cost, decision: Decision) -> Prescreen:
    """The pre-screen record of a :class:`search.pruning.base.Cost` and the pruner's answer."""
    return Prescreen(cost.params, cost.flops, cost.train_steps, cost.predicted_latency_ms,
                     cost.target_device, _answer(decision), decision.reason)


def measured(m: Measurement, decision: Decision, conversion: Conversion | None) -> Measured:
    """The measured record of a :class:`workers.records.Measurement` in target terms."""
    return Measured(m.latency_ms, m.latency_spread, tuple(m.latency_samples_ms), m.train_mb,
                    m.sample_mb, m.seconds, m.budget, m.start, conversion, _answer(decision),
                    decision.reason, m.latency_ci, m.latency_rounds, m.disturbed_rounds,
                    m.reference_ratio, m.disturbed, tuple(m.latency_attempts),
                    wait_share=m.wait_share, reference_shift=m.reference_shift,
                    host_slowdown=m.host_slowdown)


def remeasured(stored: Measured, m: Measurement, scale: float) -> Measured:
    """``stored`` with the latency of a trial that measured a disturbed latency again at its
    end (``m``: the worker's final measurement, on its own device).

    Args:
        stored: the record written when the trial was first measured (its answer is kept).
        m: the measurement with both attempts and the kept one's latency.
        scale: target-device ms per measured ms (the :class:`Conversion`'s ratio, or 1).
    """
    attempts = tuple({**a, "latency_ms": a["latency_ms"] * scale} for a in m.latency_attempts)
    return replace(stored, latency_ms=m.latency_ms * scale, latency_spread=m.latency_spread,
                   samples_ms=tuple(v * scale for v in m.latency_samples_ms),
                   latency_ci=m.latency_ci, latency_rounds=m.latency_rounds,
                   disturbed_rounds=m.disturbed_rounds, reference_ratio=m.reference_ratio,
                   disturbed=m.disturbed, latency_attempts=attempts,
                   wait_share=m.wait_share, reference_shift=m.reference_shift,
                   host_slowdown=m.host_slowdown)
