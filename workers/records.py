"""Plain records that cross process and machine boundaries (pickled by Ray and by pipes).

They hold only builtins and numpy arrays, so a worker on another machine needs no more
than this package and ``engine`` to read them. Each is written once and never edited.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

OBJECTIVES = ("fid", "latency_ms", "peak_mem_mb")
"""The study's objectives, in order; every one is minimised."""

TRIAL_MEMORY = "trial_memory_mb"
"""A constraint the worker enforces itself: the peak memory of a whole trial."""
LATENCY_TARGET = "latency_target_ms"
"""A constraint the worker enforces itself: sampling latency with the steps it chose."""


@dataclass(frozen=True)
class DataPayload:
    """What a worker needs of the dataset: shipped once per study through Ray's object store.

    ``train``/``val``/``real`` are ``(N, H, W, C)`` float32 images in [-1, 1]; ``real`` is what
    FID/KID compare against. ``feature_net`` is the feature network's safetensors file.
    ``train_labels``/``val_labels`` are the classes of ``train``/``val`` (N,), where the
    dataset has labels: a class-conditional candidate trains on them.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    real: np.ndarray
    feature_net: bytes
    train_labels: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(train_labels, val_labels)`` as :func:`engine.training.train.train` takes them."""
        if self.train_labels is None or self.val_labels is None:
            return None
        return self.train_labels, self.val_labels


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker prepares before its first trial: its device's latency table.

    ``calibration`` holds config dicts whose sampling latency calibrates the table;
    ``cache_dir`` is where the worker keeps its tables (on its own disk).
    """

    calibration: tuple[dict[str, Any], ...]
    cache_dir: str


@dataclass(frozen=True)
class Parent:
    """A mutated trial's parent: its config and EMA weights (``ema.safetensors`` bytes).

    The child starts from these weights morphed to its own architecture
    (``engine.model.morph.inherit``) and trains to ``rungs``, a shorter budget than a fresh start.
    """

    number: int
    config: dict[str, Any]
    weights: bytes
    rungs: tuple[int, ...]


@dataclass(frozen=True)
class TrialRequest:
    """One attempt at one trial: the decoded config plus how to train and evaluate it."""

    number: int
    attempt: int
    config: dict[str, Any]
    rungs: tuple[int, ...]
    fid_samples: int = 500
    grid_images: int = 64
    latency_runs: int = 5
    latency_rounds: int = 6  # the steady protocol's most rounds (engine.device.steady)
    memory: str = "sample"
    eval_seed: int = 0
    memory_limit_mb: float | None = None  # the whole trial must fit (engine.device.memory)
    # Sample with the most steps whose latency fits this (ms per image at batch 1) on the
    # worker's device; the sampler and step count come from engine.sampling.adaptive.choose_budget.
    latency_target_ms: float | None = None
    parent: Parent | None = None
    # Set by the worker: its device class and the folder of its latency tables, where the
    # trial adds its measured latency ("" when the worker keeps no table).
    device_class: str = ""
    table_dir: str = ""
    sent_at: float = 0.0  # time.time() when the coordinator dispatched it (WallTime)

    @property
    def key(self) -> tuple[int, int]:
        return (self.number, self.attempt)


@dataclass(frozen=True)
class Measurement:
    """Stage 1: latency of the whole sampling loop at batch 1, and peak memory (MB).

    ``budget`` is set under a latency target: the measured cost of one network evaluation
    and of the sampler around it, the schedule chosen from them, and why. ``start`` says
    how the weights began: ``{"status": "fresh"}``, or inherited from a parent trial.

    The latency's trust, from the steady protocol (``engine.device.bench.LatencyStat``, ``engine.device.steady``):
    ``latency_ci`` (relative half-width of the median's 95% interval), ``latency_rounds``,
    ``disturbed_rounds``, ``reference_ratio``, ``disturbed`` (too few clean samples,
    or their median's interval still wider than +-5% after the last round: another process
    kept taking the CPU, or the host's speed kept moving), ``wait_share`` (the median share of the kept
    samples' time the process waited for its core) and ``reference_shift`` (how far the
    host's own speed moved the reference's calibration during the measurement) and
    ``host_slowdown`` (how much slower than usual the host ran: the latency is scaled back
    to the usual speed by it). A disturbed latency is measured again at the end of
    the trial; ``latency_attempts`` then holds both (:func:`latency_attempt` documents) and
    the fields above are those of the one kept.
    """

    latency_ms: float
    latency_spread: float
    latency_samples_ms: tuple[float, ...]
    train_mb: float
    sample_mb: float
    seconds: float
    budget: dict[str, Any] | None = None
    start: dict[str, Any] = field(default_factory=lambda: {"status": "fresh"})
    latency_ci: float = 0.0
    latency_rounds: int = 1
    disturbed_rounds: int = 0
    reference_ratio: float = 1.0
    disturbed: bool = False
    latency_attempts: tuple[dict[str, Any], ...] = ()
    wait_share: float = 0.0
    reference_shift: float = 1.0
    host_slowdown: float = 1.0

    def memory_mb(self, which: str) -> float:
        """The memory objective: ``sample``, ``train`` or ``max`` of the two."""
        return {"sample": self.sample_mb, "train": self.train_mb,
                "max": max(self.sample_mb, self.train_mb)}[which]


LATENCY_TRUST = ("latency_ms", "latency_spread", "latency_ci", "latency_rounds",
                 "disturbed_rounds", "reference_ratio", "disturbed", "wait_share",
                 "reference_shift", "host_slowdown")
"""The fields of one latency measurement, as a :class:`Measurement` and its attempts name them."""


def latency_attempt(m: Measurement, at: str, seconds: float) -> dict[str, Any]:
    """One latency measurement of ``m`` as an entry of ``latency_attempts``: its
    :data:`LATENCY_TRUST` fields, when it was taken (``at``) and how long it took (s)."""
    return {**{name: getattr(m, name) for name in LATENCY_TRUST}, "at": at, "seconds": seconds}


@dataclass(frozen=True)
class RungReport:
    """Stage 2: the quality proxy (validation loss on the EMA weights) at a rung."""

    step: int
    val_loss: float
    train_loss: float
    elapsed_s: float
    # Every validation point so far, ``(step, val_loss)``: what a plateau is judged on.
    val_history: tuple[tuple[int, float], ...] = ()


class EventKind(enum.Enum):
    STARTED = "started"  # the child process is up; payload: {"pid": int}
    MEASURED = "measured"  # payload: Measurement; waits for a Decision
    RUNG = "rung"  # payload: RungReport; waits for a Decision


@dataclass(frozen=True)
class Event:
    """A report from a running trial; ``seq`` orders the events of one attempt."""

    number: int
    attempt: int
    seq: int
    kind: EventKind
    payload: Any
    worker: str
    needs_decision: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.number, self.attempt, self.seq)


@dataclass(frozen=True)
class Decision:
    """The coordinator's answer to a report: continue, or stop with a reason (PRUNED).

    ``keep_weights``: a stopped trial sends its checkpoint back with the outcome, because a
    new trial continues from its weights (a grown or shrunk architecture, search.hooks.adapt).
    """

    proceed: bool = True
    reason: str = ""
    keep_weights: bool = False


class Outcome(enum.Enum):
    COMPLETED = "completed"  # values and artifacts are set
    PRUNED = "pruned"  # a Decision stopped it; reason says why
    FAILED = "failed"  # the candidate itself failed (diverged, invalid, raised): no retry
    CRASHED = "crashed"  # the process died (signal, exit code) or the worker did: retried


WALL_PHASES = ("start_s", "transfer_s", "train_s", "validate_s", "features_s", "fid_s",
               "table_s", "latency_s", "write_s", "idle_s", "other_s")
"""Where an attempt's wall time went, in seconds (:class:`WallTime`)."""


@dataclass(frozen=True)
class WallTime:
    """Where one attempt's wall time went, phase by phase (seconds, ``time.perf_counter``).

    ``start_s``: from the worker's launch call to the first line of the trial process
    (interpreter start and imports, or a fork of the warm process); ``transfer_s``: the
    request and data reaching the trial process; ``train_s``: training steps;
    ``validate_s``: the validation loss at rungs; ``features_s``: loading and running the
    feature network for FID/KID; ``fid_s``: sampling the FID images; ``table_s``: adding the
    latency to the worker's table; ``latency_s``: latency and memory measurements;
    ``write_s``: packaging the artifacts, sending them back and the coordinator's writing
    them; ``idle_s``: waiting for the coordinator's answers (``answers_s`` of it, not a phase
    of its own) and for the device lock (the rest);
    ``other_s``: the rest (building the model, the coordinator's dispatch). They add up to
    ``wall_s``, the attempt from dispatch to its record. ``queued_s`` is the worker's idle
    time before the attempt (not part of ``wall_s``); ``mode`` how the trial process started
    (``spawn`` or ``fork``: :mod:`workers.forkserver`).
    """

    start_s: float = 0.0
    transfer_s: float = 0.0
    train_s: float = 0.0
    validate_s: float = 0.0
    features_s: float = 0.0
    fid_s: float = 0.0
    table_s: float = 0.0
    latency_s: float = 0.0
    write_s: float = 0.0
    idle_s: float = 0.0
    other_s: float = 0.0
    wall_s: float = 0.0
    queued_s: float = 0.0
    mode: str = ""
    answers_s: float = 0.0

    def phases(self) -> dict[str, float]:
        """``{phase: seconds}`` in :data:`WALL_PHASES` order."""
        return {name: getattr(self, name) for name in WALL_PHASES}

    @property
    def overhead_s(self) -> float:
        """Everything but training steps and FID sampling: the fixed cost of a trial."""
        return self.wall_s - self.train_s - self.fid_s

    def plus(self, **seconds: float) -> WallTime:
        """This breakdown with ``seconds`` added to the named phases (and to ``wall_s``)."""
        added = {k: getattr(self, k) + v for k, v in seconds.items()}
        return replace(self, **added, wall_s=self.wall_s + sum(seconds.values()))

    def closed(self, wall_s: float) -> WallTime:
        """This breakdown over a measured ``wall_s``: what no phase claimed goes to ``other_s``."""
        claimed = sum(v for k, v in self.phases().items() if k != "other_s")
        return replace(self, wall_s=wall_s, other_s=max(0.0, wall_s - claimed))


@dataclass(frozen=True)
class TrialOutcome:
    """What one attempt produced. ``artifacts`` maps relative paths to file bytes.

    ``constraint_values`` holds the values of the limits the worker enforces itself, by
    constraint name (``trial_memory_mb``: the trial's peak, predicted when it never ran);
    the coordinator records them against the limits.
    """

    number: int
    attempt: int
    status: Outcome
    reason: str = ""
    values: dict[str, float] = field(default_factory=dict)
    measurement: Measurement | None = None
    rungs: tuple[RungReport, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    exit_code: int | None = None
    constraint_values: dict[str, float] = field(default_factory=dict)
    latency_table: dict[str, Any] | None = None  # the worker's table, with this trial added
    walltime: WallTime | None = None  # None: the process died before it could say
