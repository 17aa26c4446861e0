"""The coordinator: ask -> dispatch -> tell, with explicit trial phases.

Only the coordinator writes to the study storage. It keeps every worker busy, never runs
a trial twice at once (a trial belongs to at most one worker, see :class:`TrialRun`),
answers each report through the pruner, writes artifacts, and retries a trial whose
process or worker died, up to a cap.
"""

from __future__ import annotations

import collections
import enum
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from engine.config import Config, ScheduleConfig
from search import adapt, artifacts, evolution, pareto
from search import study as st
from search.hardware import LATENCY, PREDICTED_LATENCY, STEP_BUDGET, TARGET_DEVICE, Hardware
from search.pool import Death, Reports, Result, Worker, WorkerPool
from search.progress import Progress, RunningTrial, Silent, Snapshot
from search.pruning import Cost, Pruner, constraint_values, stage0_values, stage1_values
from search.space import SearchSpace
from workers.records import (
    LATENCY_TARGET,
    OBJECTIVES,
    Decision,
    Event,
    EventKind,
    Measurement,
    Outcome,
    Parent,
    RungReport,
    TrialOutcome,
    TrialRequest,
)

MAX_INVALID_IN_A_ROW = 200


class Phase(enum.Enum):
    """Where a trial is; terminal states are Optuna's COMPLETE, PRUNED and FAIL."""

    QUEUED = "queued"  # asked (or to be retried), waiting for an idle worker
    STARTING = "starting"  # dispatched; its process is not up yet
    MEASURING = "measuring"  # latency and memory
    TRAINING = "training"  # between rungs
    EVALUATING = "evaluating"  # FID/KID, grid, checkpoint


@dataclass
class TrialRun:
    """One in-flight trial. ``worker`` is set exactly while a worker runs an attempt."""

    trial: optuna.Trial
    config: Config
    cost: Cost
    phase: Phase = Phase.QUEUED
    attempt: int = 0
    worker: str | None = None
    pid: int | None = None
    asked_at: float = field(default_factory=time.time)
    attempt_started: float = 0.0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    rungs: list[dict[str, Any]] = field(default_factory=list)
    measurement: Measurement | None = None  # the latest attempt's, in target-device terms
    avoid: set[str] = field(default_factory=set)
    overhead_s: float = 0.0
    parent: int | None = None  # a mutation child that inherits this trial's weights
    latency: dict[str, Any] | None = None  # where the latency was measured, its conversion
    adapting: Adapting | None = None  # stopped at a rung to continue as another trial

    @property
    def number(self) -> int:
        return self.trial.number


@dataclass(frozen=True)
class Adapting:
    """A trial stopped at rung ``step`` to continue as ``choice`` (search.adapt)."""

    trigger: adapt.Trigger
    choice: adapt.Choice
    step: int


@dataclass
class Tally:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)


class InvalidSpaceError(ValueError):
    """The sampler keeps proposing parameters that decode to no valid config."""


class Coordinator:
    """Runs study trials on a :class:`WorkerPool` until ``target`` trials have finished."""

    def __init__(self, study: optuna.Study, space: SearchSpace, pool: WorkerPool,
                 data_ref: Any, channels: int, results: Path, pruner: Pruner, target: int,
                 max_retries: int = 2, progress: Progress | None = None,
                 deadline: float | None = None, latency_target_ms: float | None = None
                 ) -> None:
        self.study, self.space, self.pool = study, space, pool
        self.data_ref, self.channels, self.results = data_ref, channels, results
        self.pruner, self.target, self.max_retries = pruner, target, max_retries
        self.progress = progress or Silent()
        self.deadline = deadline
        self.latency_target_ms = latency_target_ms
        self.limits = space.constraints.limits()
        if latency_target_ms is not None:
            self.limits[LATENCY_TARGET] = latency_target_ms
        self.hardware = (Hardware(space.study.target_device,
                                  study.user_attrs.get(TARGET_DEVICE, ""))
                         if space.study.latency_table else None)
        self.seed = int(study.user_attrs.get("seed", space.study.seed))
        self._learned: set[str] = set()
        self.runs: dict[int, TrialRun] = {}
        self.queue: collections.deque[TrialRun] = collections.deque()
        self.tally = Tally()
        self.finished_before = st.finished_count(study)
        self.store = artifacts.artifact_store(results)
        self.started = time.time()
        self._messages: list[str] = []
        self._distributions = space.distributions()
        self._stored: tuple[collections.Counter[TrialState], int, float] | None = None

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> Tally:
        """Ask, dispatch and tell until the target is reached (or the deadline passes).

        On ``KeyboardInterrupt`` the in-flight trials are failed and their params queued
        again (as a killed coordinator's would be on resume), then the interrupt propagates.
        """
        self.pruner.restore(self.study.get_trials(deepcopy=False))
        try:
            while not self._done():
                self.pool.refresh()
                self._learn_workers()
                self._fill()
                for completion in self.pool.wait(0.5):
                    self._handle(completion)
                self._show()
        except KeyboardInterrupt:
            for run in list(self.runs.values()):
                frozen = self.study._storage.get_trial(run.trial._trial_id)
                st.requeue(self.study, frozen, "interrupted; params queued again")
            self.runs.clear()
            raise
        self._show()
        return self.tally

    def _done(self) -> bool:
        return not self.runs and not self._may_ask()

    def _may_ask(self) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            return False
        return self._finished() + len(self.runs) < self.target

    def _finished(self) -> int:
        t = self.tally
        return self.finished_before + t.complete + t.pruned + t.failed

    def _learn_workers(self) -> None:
        """Take in the device class and latency table of every worker that came up."""
        if self.hardware is None:
            return
        for worker in self.pool.workers.values():
            if worker.name not in self._learned:
                self._learned.add(worker.name)
                self.hardware.learn(worker.profile)
                if worker.profile.get("latency_error"):
                    self._say(f"{worker.name}: {worker.profile['latency_error']}")
        if self.hardware.target and TARGET_DEVICE not in self.study.user_attrs:
            self.study.set_user_attr(TARGET_DEVICE, self.hardware.target)
        self.hardware.check_target(self.pool.starting())

    def _fill(self) -> None:
        """Give every idle worker a trial: a queued retry first, else a fresh ask (once the
        target device's latency table is in, so that every candidate gets a prediction)."""
        if self.hardware is not None and self.hardware.waiting():
            return
        for worker in self.pool.idle():
            run = self._next_for(worker)
            if run is not None:
                self._dispatch(run, worker)

    def _next_for(self, worker: Worker) -> TrialRun | None:
        """A queued retry goes to a worker it has not crashed on (unless every worker is one);
        otherwise the worker gets a freshly asked trial."""
        for run in self.queue:
            if worker.name not in run.avoid or set(self.pool.workers) <= run.avoid:
                self.queue.remove(run)
                return run
        return self._ask() if self._may_ask() else None

    # -- ask and stage 0 ------------------------------------------------------------------

    def _ask(self) -> TrialRun | None:
        from engine.model.cost import flops, param_count

        for _ in range(MAX_INVALID_IN_A_ROW):
            start = time.perf_counter()
            self._maybe_mutate()
            trial = self.study.ask(fixed_distributions=self._distributions)
            try:
                config = self.space.decode(trial.params, self.channels)
            except ValueError as err:
                self._tell_invalid(trial, str(err))
                if not self._may_ask():
                    return None
                continue
            trial.set_user_attr(st.CONFIG, config.to_dict())
            parent = self._inheriting(trial, config)
            steps = (adapt.steps_of(trial) or evolution.inherit_steps(
                config.train.steps, self.space.study.inherit_budget)
                if parent is not None else config.train.steps)
            cost = Cost(param_count(config.unet), flops(config.unet), steps,
                        *self._predicted(trial, config))
            run = TrialRun(trial, config, cost, parent=parent)
            run.overhead_s += time.perf_counter() - start
            decision = self.pruner.prescreen(trial.number, cost)
            trial.set_user_attr(st.COST, _with_decision(
                {**asdict(cost), **_lineage(trial)}, decision))
            if not decision.proceed:  # stage 0: record what is known, so the sampler learns
                self._constrain(run, None)
                self._tell(run, TrialState.PRUNED, decision.reason)
                if not self._may_ask():
                    return None
                continue
            self.runs[trial.number] = run
            return run
        raise InvalidSpaceError(f"the last {MAX_INVALID_IN_A_ROW} proposals were all invalid "
                                "configs; check the search space")

    def _maybe_mutate(self) -> None:
        """With probability ``mutation_rate``, enqueue a mutation of a Pareto-front trial
        (search.evolution) for the next ask; the draw depends on the seed and the trial count,
        so a resumed study draws as the uninterrupted one would."""
        rate = self.space.study.mutation_rate
        if rate <= 0:
            return
        rng = np.random.default_rng([self.seed, len(self.study.get_trials(deepcopy=False))])
        if rng.random() < rate:
            evolution.enqueue_mutation(self.study, self.space, self.channels, rng)

    def _inheriting(self, trial: optuna.Trial, config: Config) -> int | None:
        """The parent whose weights a mutation child starts from, if it can; else None,
        with the reason recorded."""
        parent = trial.user_attrs.get(evolution.PARENT)
        if parent is None:
            return None
        why = evolution.reachable(self.study, parent, config)
        if why:
            trial.set_user_attr(evolution.INHERITANCE,
                                {"status": "fresh", "parent": parent, "reason": why})
            return None
        return int(parent)

    def _predicted(self, trial: optuna.Trial, config: Config) -> tuple[float | None, str]:
        """Stage 0: the candidate's latency predicted on the target device (user attr), with
        the schedule a latency target would choose there."""
        if self.hardware is None:
            return None, ""
        predicted = (self.hardware.predict(config) if self.latency_target_ms is None else
                     self.hardware.predict_budgeted(config, self.latency_target_ms))
        trial.set_user_attr(PREDICTED_LATENCY, {"ms": predicted,
                                                "device_class": self.hardware.target})
        return predicted, self.hardware.target

    def _tell_invalid(self, trial: optuna.Trial, reason: str) -> None:
        """An impossible combination: PRUNED and infeasible, so the sampler avoids it."""
        trial.set_user_attr(st.REASON, f"invalid config: {reason}")
        trial.set_user_attr(st.FEASIBLE, False)
        trial.set_constraint("valid_config", 1.0)
        self.study.tell(trial, state=TrialState.PRUNED)
        self._stored = None
        self.tally.pruned += 1
        self._say(f"trial {trial.number} pruned: invalid config: {reason}")

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, run: TrialRun, worker: Worker) -> None:
        assert run.worker is None, f"trial {run.number} already runs on {run.worker}"
        start = time.perf_counter()
        ev = self.space.evaluate
        request = TrialRequest(run.number, run.attempt, run.config.to_dict(),
                               self.space.rungs.steps(run.config.train.steps),
                               fid_samples=ev.fid_samples, grid_images=ev.grid_images,
                               latency_runs=ev.latency_runs, memory=ev.memory,
                               eval_seed=ev.seed,
                               memory_limit_mb=self.space.constraints.max_trial_memory_mb,
                               latency_target_ms=self._target_on(worker, run.config),
                               parent=self._parent_weights(run))
        self.pool.dispatch(worker, request, self.data_ref)
        run.worker, run.phase, run.pid = worker.name, Phase.STARTING, None
        run.attempt_started = time.time()
        run.overhead_s += time.perf_counter() - start

    def _target_on(self, worker: Worker, config: Config) -> float | None:
        """The study's latency target in the terms of ``worker``'s device class."""
        if self.latency_target_ms is None or self.hardware is None:
            return self.latency_target_ms
        ratio = self.hardware.ratio(config, _device_class(worker))
        return self.latency_target_ms / (ratio or 1.0)

    def _parent_weights(self, run: TrialRun) -> Parent | None:
        """The parent's config and weights for a mutation child (read from its artifacts)."""
        if run.parent is None:
            return None
        parent = evolution.load_parent(self.study, run.parent,
                                       self.space.rungs.steps(run.cost.train_steps))
        if parent is None:
            run.trial.set_user_attr(evolution.INHERITANCE, {
                "status": "fresh", "parent": run.parent,
                "reason": f"trial {run.parent}'s weights are gone from its artifacts"})
        return parent

    # -- reports, results, deaths ---------------------------------------------------------

    def _handle(self, completion: Reports | Result | Death) -> None:
        if isinstance(completion, Reports):
            for event in completion.events:
                self._on_event(completion.worker, event)
        elif isinstance(completion, Result):
            self._on_result(completion.outcome)
        else:
            self._on_death(completion)

    def _current(self, number: int, attempt: int) -> TrialRun | None:
        run = self.runs.get(number)
        return run if run is not None and run.attempt == attempt and run.worker else None

    def _on_event(self, worker: Worker, event: Event) -> None:
        run = self._current(event.number, event.attempt)
        if run is None:
            if event.needs_decision:
                self.pool.decide(worker, event.key, Decision(False, "stale attempt"))
            return
        start = time.perf_counter()
        if event.kind is EventKind.STARTED:
            run.pid, run.phase = event.payload["pid"], Phase.MEASURING
        elif event.kind is EventKind.MEASURED:
            measured: Measurement = event.payload
            if measured.budget is not None:
                self._budgeted(run, measured.budget)
            if measured.start.get("parent") is not None:
                run.trial.set_user_attr(evolution.INHERITANCE, measured.start)
            run.measurement = self._in_target_terms(run, worker, measured)
            decision = self.pruner.on_measured(run.number, run.measurement)
            run.trial.set_user_attr(st.MEASUREMENT,
                                    _measurement_doc(run.measurement, decision, run.latency))
            run.phase = Phase.TRAINING
            self.pool.decide(worker, event.key, decision)
        elif event.kind is EventKind.RUNG:
            rung: RungReport = event.payload
            decision = self.pruner.on_rung(run.number, rung, run.measurement)
            last = rung.step >= run.cost.train_steps
            if decision.proceed and not last:
                decision = self._adapt(run, rung) or decision
            doc = {k: v for k, v in asdict(rung).items() if k != "val_history"}
            run.rungs.append({**doc, "attempt": run.attempt,
                              "decision": _rung_decision(decision), "reason": decision.reason})
            run.trial.set_user_attr(st.RUNGS, run.rungs)
            run.phase = Phase.EVALUATING if last and decision.proceed else Phase.TRAINING
            self.pool.decide(worker, event.key, decision)
        run.overhead_s += time.perf_counter() - start

    def _adapt(self, run: TrialRun, rung: RungReport) -> Decision | None:
        """Stop the trial to grow or shrink it into a new trial, when ``[adapt]`` says so
        and the space has such a neighbour (search.adapt)."""
        settings = self.space.adapt
        if not settings.enabled or run.measurement is None:
            return None
        points = {r["step"]: r["val_loss"] for r in run.rungs if r["attempt"] == run.attempt}
        points.update(rung.val_history)  # every eval_every steps, and the rungs so far
        points[rung.step] = rung.val_loss
        history = sorted(points.items())
        def peers() -> list[float]:
            return adapt.peers(self.study.get_trials(deepcopy=False), rung.step, run.number)

        fired = adapt.trigger(settings, history, run.measurement.latency_ms, peers,
                              adapt.depth(run.trial))
        if fired is None:
            return None
        cost = self.hardware.predict if self.hardware is not None else None
        choice = adapt.choose(fired.kind, self.space, dict(run.trial.params), self.channels,
                              run.measurement.latency_ms, cost, settings.shrink_above_ms)
        if choice is None:
            self._say(f"trial {run.number}: {fired.reason}, but the space has no neighbour "
                      f"to {fired.kind} into")
            return None
        run.adapting = Adapting(fired, choice, rung.step)
        return Decision(False, f"{fired.kind}: {fired.reason}; continues as {choice.change}",
                        keep_weights=True)

    def _in_target_terms(self, run: TrialRun, worker: Worker, m: Measurement) -> Measurement:
        """The measurement with its latency converted to the target device class; both
        numbers go into the trial's ``latency`` user attr."""
        if self.hardware is None:
            return m
        run.latency = self.hardware.convert(run.config, m.latency_ms, _device_class(worker))
        run.trial.set_user_attr(LATENCY, run.latency)
        ratio = run.latency["latency_ms"] / m.latency_ms if m.latency_ms > 0 else 1.0
        return replace(m, latency_ms=run.latency["latency_ms"],
                       latency_samples_ms=tuple(v * ratio for v in m.latency_samples_ms))

    def _budgeted(self, run: TrialRun, budget: dict[str, Any]) -> None:
        """The worker chose the schedule for the latency target: the trial's config says so."""
        run.trial.set_user_attr(STEP_BUDGET, budget)
        schedule = ScheduleConfig(**budget["schedule"])
        run.config = replace(run.config, schedule=schedule)
        run.trial.set_user_attr(st.CONFIG, run.config.to_dict())

    def _on_result(self, outcome: TrialOutcome) -> None:
        run = self._current(outcome.number, outcome.attempt)
        assert run is not None, f"result for unknown trial {outcome.number}/{outcome.attempt}"
        worker = self.pool.find(outcome.worker)
        if self.hardware is not None and outcome.latency_table and worker is not None:
            self.hardware.update(_device_class(worker), outcome.latency_table)
        self._end_attempt(run, outcome.status.value, outcome.reason, outcome.worker)
        if outcome.status is Outcome.CRASHED:
            self._retry_or_fail(run, outcome.reason)
        elif outcome.status is Outcome.COMPLETED:
            self._complete(run, outcome)
        elif run.adapting is not None and outcome.status is Outcome.PRUNED:
            self._continue_adapted(run, run.adapting, outcome)
        else:
            self._record(run, outcome)
            state = TrialState.PRUNED if outcome.status is Outcome.PRUNED else TrialState.FAIL
            self._tell(run, state, outcome.reason)

    def _on_death(self, death: Death) -> None:
        self._say(death.reason)
        if death.trial is None:
            return
        run = self._current(death.trial, death.attempt)
        if run is not None:
            self._end_attempt(run, "worker died", death.reason, death.worker.name)
            self._retry_or_fail(run, death.reason)

    def _end_attempt(self, run: TrialRun, status: str, reason: str, worker: str) -> None:
        run.attempts.append({"attempt": run.attempt, "worker": worker, "status": status,
                             "reason": reason, "started": run.attempt_started,
                             "ended": time.time()})
        run.trial.set_user_attr(st.ATTEMPTS, run.attempts)
        run.worker, run.pid = None, None

    def _retry_or_fail(self, run: TrialRun, reason: str) -> None:
        if run.attempt >= self.max_retries:
            self._tell(run, TrialState.FAIL,
                       f"gave up after {run.attempt + 1} attempts; last: {reason}")
            return
        run.avoid.add(run.attempts[-1]["worker"])
        run.attempt += 1
        run.adapting = None  # the next attempt is judged afresh
        run.phase = Phase.QUEUED
        self.queue.appendleft(run)
        self._say(f"trial {run.number} retried (attempt {run.attempt + 1}): {reason}")

    # -- tell -----------------------------------------------------------------------------

    def _complete(self, run: TrialRun, outcome: TrialOutcome) -> None:
        start = time.perf_counter()
        values = [self._target_value(run, name, outcome.values[name]) for name in OBJECTIVES]
        if not all(math.isfinite(v) for v in values):
            self._record(run, outcome)
            self._tell(run, TrialState.FAIL, f"non-finite objective values {values}")
            return
        self._keep_artifacts(run, outcome)
        self._record(run, outcome)
        run.overhead_s += time.perf_counter() - start
        self._tell(run, TrialState.COMPLETE, "", values, outcome.timings.get("total_s"))

    def _continue_adapted(self, run: TrialRun, adapting: Adapting, outcome: TrialOutcome
                          ) -> None:
        """Keep the stopped trial's checkpoint, enqueue the trial it continues as (the next
        ask runs it), then tell it PRUNED with the child's number."""
        self._keep_artifacts(run, outcome)
        reason = outcome.reason
        if evolution.WEIGHTS in outcome.artifacts:
            left = max(1, run.cost.train_steps - adapting.step)
            child = adapt.enqueue(self.study, run.number, adapting.choice, adapting.trigger,
                                  adapting.step, left, adapt.depth(run.trial))
            run.trial.set_user_attr(adapt.ADAPTED_INTO, {
                "trial": child, "trigger": adapting.trigger.kind,
                **adapt.describe(adapting.choice)})
            reason = f"{reason} (trial {child})"
        self._record(run, outcome)
        self._tell(run, TrialState.PRUNED, reason)

    def _keep_artifacts(self, run: TrialRun, outcome: TrialOutcome) -> None:
        folder = artifacts.trial_dir(self.results, self.study.study_name, run.number)
        paths = artifacts.write_trial(folder, outcome.artifacts)
        run.trial.set_user_attr(st.ARTIFACTS, paths)
        run.trial.set_user_attr("artifact_ids", artifacts.register(run.trial, self.store, paths))

    def _record(self, run: TrialRun, outcome: TrialOutcome) -> None:
        """Everything but the state: device, timings, quality, and the constraint values."""
        t = run.trial
        if outcome.device:
            t.set_user_attr(st.DEVICE, outcome.device)
        t.set_user_attr(st.WORKER, outcome.worker)
        worker = self.pool.find(outcome.worker)
        if worker is not None:
            t.set_user_attr(st.NODE, {"id": worker.profile.get("node_id", ""),
                                      "host": worker.profile.get("host", "")})
        if outcome.metrics.get("quality"):
            t.set_user_attr(st.QUALITY, outcome.metrics["quality"])
        t.set_user_attr(st.TIMINGS, dict(outcome.timings))
        reported = {name: self._target_value(run, name, value)
                    for name, value in outcome.constraint_values.items()}
        self._constrain(run, run.measurement, reported)

    def _target_value(self, run: TrialRun, name: str, value: float) -> float:
        """A latency the worker measured on its device, in target-device terms."""
        if name in ("latency_ms", LATENCY_TARGET) and run.latency:
            return value * (run.latency["ratio"] or 1.0)
        return value

    def _constrain(self, run: TrialRun, measurement: Measurement | None,
                   reported: dict[str, float] | None = None) -> None:
        """Record the constraint values of every limit whose value is known: stage 0, the
        measurement, and what the worker ``reported`` for the limits it enforces."""
        limits = self.limits
        if not limits:
            return
        known = stage0_values(run.cost)
        if measurement is not None:
            known.update(stage1_values(measurement, self.space.evaluate.memory))
        known.update(reported or {})
        violations = constraint_values(known, limits)
        for name, value in violations.items():
            run.trial.set_constraint(name, value)
        run.trial.set_user_attr(st.FEASIBLE, all(v <= 0 for v in violations.values()))

    def _tell(self, run: TrialRun, state: TrialState, reason: str,
              values: list[float] | None = None, duration: float | None = None) -> None:
        start = time.perf_counter()
        if reason:
            run.trial.set_user_attr(st.REASON, reason)
        run.trial.set_user_attr(st.TIMINGS, {**run.trial.user_attrs.get(st.TIMINGS, {}),
                                            "wall_s": time.time() - run.asked_at,
                                            "coordinator_s": run.overhead_s})
        self.study.tell(run.trial, values=values, state=state)
        self._stored = None
        run.overhead_s += time.perf_counter() - start
        self.runs.pop(run.number, None)
        if state is TrialState.COMPLETE:
            self.tally.complete += 1
            self.tally.durations.append(time.time() - run.asked_at)
            self.tally.overheads.append(run.overhead_s)
            shown = ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, values or []))
            self._say(f"trial {run.number} complete: {shown}")
        elif state is TrialState.PRUNED:
            self.tally.pruned += 1
            self._say(f"trial {run.number} pruned: {reason}")
        else:
            self.tally.failed += 1
            self._say(f"trial {run.number} failed: {reason}")

    # -- progress -------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self._messages.append(message)

    def _show(self) -> None:
        self.progress.update(self.snapshot())
        self._messages = []

    def snapshot(self) -> Snapshot:
        """Counts, running trials, front size, hypervolume and ETA right now."""
        if self._stored is None:  # re-read the storage only after a tell
            self._stored = self._stored_summary()
        counts, front, hv = self._stored
        now = time.time()
        running = tuple(self._running(r, now) for r in sorted(self.runs.values(),
                                                              key=lambda r: r.number))
        return Snapshot(self.study.study_name, self.target, counts[TrialState.COMPLETE],
                        counts[TrialState.PRUNED], counts[TrialState.FAIL], running,
                        len(self.queue), len(self.pool.workers), front, hv,
                        now - self.started, self._eta(), tuple(self._messages))

    def _stored_summary(self) -> tuple[collections.Counter[TrialState], int, float]:
        trials = self.study.get_trials(deepcopy=False)
        points = st.objective_values([t for t in trials if st.feasible(t)])
        if not len(points):
            return collections.Counter(t.state for t in trials if st.is_finished(t)), 0, 0.0
        ref = self.space.study.reference_point or tuple(pareto.default_reference(points))
        return (collections.Counter(t.state for t in trials if st.is_finished(t)),
                int(pareto.pareto_mask(points).sum()), pareto.hypervolume(points, ref))

    def _running(self, run: TrialRun, now: float) -> RunningTrial:
        worker = self.pool.find(run.worker) if run.worker else None
        profile = worker.profile if worker else {}
        return RunningTrial(run.number, run.attempt, run.worker or "-", run.phase.value, run.pid,
                            profile.get("pid"), profile.get("node_id", ""), now - run.asked_at)

    def _eta(self) -> float | None:
        durations = self.tally.durations
        workers = max(1, len(self.pool.workers))
        if not durations:
            return None
        remaining = max(0, self.target - self._finished())
        return float(np.mean(durations)) * math.ceil(remaining / workers)


def _device_class(worker: Worker) -> str:
    return str(worker.profile.get("device_class", ""))


def _lineage(trial: optuna.Trial) -> dict[str, Any]:
    """A mutation child's parent and mutation, shown with its stage-0 record."""
    keys = (evolution.PARENT, evolution.MUTATION)
    return {k: trial.user_attrs[k] for k in keys if k in trial.user_attrs}


def _rung_decision(decision: Decision) -> str:
    if decision.proceed:
        return "continue"
    return "adapt" if decision.keep_weights else "prune"


def _measurement_doc(m: Measurement, decision: Decision,
                     latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage-1 record; ``latency`` says on which device class it was measured."""
    doc = asdict(m)
    doc.pop("latency_samples_ms")
    doc["samples_ms"] = list(m.latency_samples_ms)
    if latency is not None:
        doc["measured_on"] = latency
    return _with_decision(doc, decision)


def _with_decision(doc: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """A stage's stored numbers plus the pruner's answer to them (``status --trial N``)."""
    return {**doc, "decision": "continue" if decision.proceed else "prune",
            "reason": decision.reason}
