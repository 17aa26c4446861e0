"""The coordinator: the loop that keeps every worker busy and routes what they report.

Each turn it refreshes the worker pool, gives every idle worker a trial (a queued retry
first, else a freshly asked one), and hands every report, result and death to the stage
it belongs to (:mod:`search.run.stages`, which reads top to bottom in the order a trial
lives). Only the coordinator writes to the study storage; a trial belongs to at most one
worker at a time; a trial whose process or worker died is retried up to a cap.
"""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from search import pareto
from search.hooks.adapt import AdaptHook
from search.hooks.evolution import EvolutionHook
from search.hooks.hardware import HardwareHook
from search.pruning.base import Pruner
from search.run import stages
from search.run.pipeline import Context, Flight, Hook, Hooks, Tally
from search.run.pool import Death, Reports, Result, Worker, WorkerPool
from search.run.progress import Progress, RunningTrial, Silent, Snapshot
from search.run.stages import InvalidSpaceError
from search.space import SearchSpace
from search.storage import study as st
from search.storage import timing as stored_time
from search.storage.lease import Lease
from workers.records import LATENCY_TARGET, Decision, Event, EventKind

__all__ = ["Coordinator", "InvalidSpaceError", "Tally"]


def default_hooks(study: optuna.Study, space: SearchSpace, channels: int,
                  latency_target_ms: float | None) -> list[Hook]:
    """The features a space turns on: latency tables, evolution, adaptation."""
    hardware = (HardwareHook(space, study, latency_target_ms)
                if space.study.latency_table else None)
    hooks: list[Hook] = [hardware] if hardware is not None else []
    hooks.append(EvolutionHook(space, study))
    hooks.append(AdaptHook(space, hardware.hardware.predict if hardware else None))
    return hooks


class Coordinator:
    """Runs study trials on a :class:`WorkerPool` until ``target`` trials have finished."""

    def __init__(self, study: optuna.Study, space: SearchSpace, pool: WorkerPool,
                 data_ref: Any, channels: int, results: Path, pruner: Pruner, target: int,
                 max_retries: int = 2, progress: Progress | None = None,
                 deadline: float | None = None, latency_target_ms: float | None = None,
                 lease: Lease | None = None) -> None:
        limits = space.constraints.limits()
        if latency_target_ms is not None:
            limits[LATENCY_TARGET] = latency_target_ms
        hooks = Hooks(default_hooks(study, space, channels, latency_target_ms))
        self.ctx = Context(study, space, pool, pruner, hooks, data_ref, channels, results,
                           limits, max_retries, latency_target_ms, say=self._say)
        self.study, self.space, self.pool = study, space, pool
        self.target, self.deadline = target, deadline
        self.lease = lease  # renewed every turn; a lost lease stops the loop
        self.progress = progress or Silent()
        self.finished_before = st.finished_count(study)
        self.started = time.time()
        self._messages: list[str] = []
        self._summary: tuple[int, tuple[collections.Counter[TrialState], int, float]] | None
        self._summary = None
        self._recorded: set[str] = set()  # workers whose own costs are stored

    @property
    def tally(self) -> Tally:
        return self.ctx.tally

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> Tally:
        """Ask, dispatch and tell until the target is reached (or the deadline passes).

        On ``KeyboardInterrupt`` the in-flight trials are failed and their params queued
        again (as a killed coordinator's would be on resume), then the interrupt propagates.

        Raises:
            LeaseLostError: another coordinator took the study over; the loop stops
                without touching its trials again.
        """
        self.ctx.pruner.restore(self.study.get_trials(deepcopy=False))
        try:
            while self.ctx.flights or self._may_ask():
                if self.lease is not None:
                    self.lease.renew()
                self.pool.refresh()
                self._record_workers()
                if self.ctx.hooks.ready(self.ctx):
                    self._fill()
                for completion in self.pool.wait(0.5):
                    self._route(completion)
                self._show()
        except KeyboardInterrupt:
            for flight in list(self.ctx.flights.values()):
                st.requeue(self.study, flight.trial, "interrupted; params queued again")
            self.ctx.flights.clear()
            raise
        self._show()
        return self.tally

    def _record_workers(self) -> None:
        """Store each new worker's own costs (its start and latency table) on the study."""
        for worker in self.pool.workers.values():
            doc = worker.profile.get("walltime")
            if worker.name not in self._recorded and doc is not None:
                stored_time.write_worker(self.study, stored_time.WorkerTime(worker.name, **doc))
                self._recorded.add(worker.name)

    def _may_ask(self) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            return False
        return self._finished() + len(self.ctx.flights) < self.target

    def _finished(self) -> int:
        t = self.tally
        return self.finished_before + t.complete + t.pruned + t.failed

    def _fill(self) -> None:
        """Give every idle worker a trial."""
        for worker in self.pool.idle():
            flight = self._next_for(worker)
            if flight is not None:
                stages.dispatch(self.ctx, flight, worker)

    def _next_for(self, worker: Worker) -> Flight | None:
        """A queued retry goes to a worker it has not crashed on (unless every worker is one);
        otherwise the worker gets a freshly asked trial."""
        for flight in self.ctx.queue:
            if worker.name not in flight.avoid or set(self.pool.workers) <= flight.avoid:
                self.ctx.queue.remove(flight)
                return flight
        return stages.ask(self.ctx, self._may_ask) if self._may_ask() else None

    def _route(self, completion: Reports | Result | Death) -> None:
        """Hand a completion to its stage; reports of an attempt that is no longer current
        (retried, or its trial told) are answered "stale" and dropped."""
        if isinstance(completion, Reports):
            for event in completion.events:
                self._report(completion.worker, event)
        elif isinstance(completion, Result):
            outcome = completion.outcome
            flight = self._current(outcome.number, outcome.attempt)
            assert flight is not None, f"result for unknown trial {outcome.number}/{outcome.attempt}"
            stages.on_result(self.ctx, flight, outcome)
        else:
            self._died(completion)

    def _report(self, worker: Worker, event: Event) -> None:
        flight = self._current(event.number, event.attempt)
        if flight is None:
            if event.needs_decision:
                self.pool.decide(worker, event.key, Decision(False, "stale attempt"))
            return
        start = time.perf_counter()
        answer = {EventKind.STARTED: lambda: stages.on_started(flight, event.payload["pid"]),
                  EventKind.MEASURED: lambda: stages.on_measured(self.ctx, flight, worker,
                                                                 event.payload),
                  EventKind.RUNG: lambda: stages.on_rung(self.ctx, flight, event.payload)
                  }[event.kind]()
        if answer is not None:
            self.pool.decide(worker, event.key, answer)
        flight.overhead_s += time.perf_counter() - start

    def _died(self, death: Death) -> None:
        self._say(death.reason)
        flight = (self._current(death.trial, death.attempt) if death.trial is not None
                  else None)
        if flight is not None:
            stages.on_death(self.ctx, flight, death.worker.name, death.reason)

    def _current(self, number: int, attempt: int) -> Flight | None:
        flight = self.ctx.flights.get(number)
        return (flight if flight is not None and flight.attempt == attempt
                and flight.current is not None else None)

    # -- progress -------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        self._messages.append(message)

    def _show(self) -> None:
        self.progress.update(self.snapshot())
        self._messages = []

    def snapshot(self) -> Snapshot:
        """Counts, running and queued trials, front size, hypervolume and ETA right now.

        A trial in flight runs while an attempt of it is on a worker; one waiting in the
        retry queue (its worker died) is queued, not running.
        """
        if self._summary is None or self._summary[0] != self.ctx.told:
            self._summary = (self.ctx.told, self._stored_summary())  # re-read after a tell
        counts, front, hv = self._summary[1]
        now = time.time()
        on_workers = [f for f in self.ctx.flights.values() if f.current is not None]
        running = tuple(self._running(f, now) for f in sorted(on_workers, key=lambda f: f.number))
        return Snapshot(self.study.study_name, self.target, counts[TrialState.COMPLETE],
                        counts[TrialState.PRUNED], counts[TrialState.FAIL], running,
                        len(self.ctx.queue), len(self.pool.workers), front, hv,
                        now - self.started, self._eta(), tuple(self._messages),
                        self.pool.starting())

    def _stored_summary(self) -> tuple[collections.Counter[TrialState], int, float]:
        trials = self.study.get_trials(deepcopy=False)
        counts = collections.Counter(t.state for t in trials if st.is_finished(t))
        points = st.objective_values([t for t in trials if st.feasible(t)])
        if not len(points):
            return counts, 0, 0.0
        ref = self.space.study.reference_point or tuple(pareto.default_reference(points))
        return counts, int(pareto.pareto_mask(points).sum()), pareto.hypervolume(points, ref)

    def _running(self, flight: Flight, now: float) -> RunningTrial:
        current = flight.current
        assert current is not None, f"trial {flight.number} is queued, not running"
        worker = self.pool.find(current.worker)
        profile = worker.profile if worker else {}
        return RunningTrial(flight.number, flight.attempt, current.worker, flight.phase.value,
                            current.pid, profile.get("pid"), profile.get("node_id", ""),
                            now - flight.asked_at)

    def _eta(self) -> float | None:
        durations = self.tally.durations
        workers = max(1, len(self.pool.workers))
        if not durations:
            return None
        remaining = max(0, self.target - self._finished())
        return float(np.mean(durations)) * math.ceil(remaining / workers)
