"""The body of one trial, run in a child process of a worker (``python -m workers.trial FD``).

Measure latency and peak memory, train in rungs (reporting each to the coordinator and
obeying its continue/prune answer), evaluate FID/KID, draw a sample grid and save the
checkpoint. A latency the steady protocol marked disturbed is measured once more after the
evaluation, and both attempts are reported. Everything goes back as a
:class:`TrialOutcome` with the files as bytes.

The child talks to its parent over one inherited socket (a multiprocessing
``Connection``): ``("run", TrialRequest, DataPayload)`` and ``("decision", Decision)``
come in; ``("event", kind, payload)`` and ``("done", TrialOutcome)`` go out.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import engine  # noqa: F401  (binds an optimised BLAS before mlx loads)

# isort: split
import mlx.core as mx
from mlx.utils import tree_unflatten

from engine.config import Config
from engine.data.images import grid_png
from engine.device.bench import device_fingerprint
from engine.device.memory import MemoryBudgetExceeded, check_peak, enforce_limit
from engine.io.checkpoint import save_checkpoint
from engine.measure import (
    LatencyTargetInfeasible,
    QualityResult,
    fit_step_budget,
    sample_images,
)
from engine.model.cost import flops, param_count
from engine.model.morph import inherit, inherited_state
from engine.quality.features import FeatureNetwork
from engine.quality.metrics import evaluate_quality
from engine.training.train import TrainingDiverged, TrainState, init_state, train, validation_loss
from workers import measuring
from workers.clock import PhaseClock
from workers.device_lock import DeviceLock, DeviceLockTimeout
from workers.records import (
    LATENCY_TARGET,
    TRIAL_MEMORY,
    DataPayload,
    Decision,
    EventKind,
    Measurement,
    Outcome,
    RungReport,
    TrialOutcome,
    TrialRequest,
)
from workers.table import observe_trial

Ask = Callable[[EventKind, Any], Decision]
"""Sends a report to the coordinator and blocks for its answer."""

DEVICE = DeviceLock()
"""This machine's device: shared while computing, exclusive while timing a measurement."""


def run_trial(request: TrialRequest, data: DataPayload, ask: Ask,
              clock: PhaseClock | None = None) -> TrialOutcome:
    """Run one attempt of one trial; candidate errors become FAILED outcomes, not exceptions.

    A candidate that cannot meet a limit the worker enforces ends at once as PRUNED, with
    its constraint value: under a memory limit (``request.memory_limit_mb``) its predicted
    or measured peak, under a latency target one step's latency.

    Args:
        request: the attempt.
        data: the study's data.
        ask: sends a report and blocks for the coordinator's answer (timed as idle).
        clock: where the phases are timed (started by the caller, which timed the start and
            the transfer); a new one when omitted.
    """
    done = _Progress(request, clock or PhaseClock(DEVICE))
    ask = done.timed(ask)
    try:
        return _run(request, data, ask, done)
    except MemoryBudgetExceeded as err:
        return done.outcome(Outcome.PRUNED, f"over the trial memory limit: {err}",
                            constraint_values={TRIAL_MEMORY: err.needed_mb})
    except LatencyTargetInfeasible as err:
        return done.outcome(Outcome.PRUNED, f"latency target: {err}",
                            constraint_values={LATENCY_TARGET: err.floor_ms})
    except TrainingDiverged as err:
        return _failed(done, f"diverged: {err}")
    except DeviceLockTimeout as err:  # the machine's fault, not the candidate's: retried
        return TrialOutcome(request.number, request.attempt, Outcome.CRASHED, reason=str(err))
    except Exception as err:  # noqa: BLE001 (the candidate's own error: FAILED, no retry)
        tail = traceback.format_exc(limit=-3)
        return _failed(done, f"{type(err).__name__}: {err}", {"traceback": tail})


def _failed(done: _Progress, reason: str, metrics: dict[str, Any] | None = None
            ) -> TrialOutcome:
    return TrialOutcome(done.request.number, done.request.attempt, Outcome.FAILED,
                        reason=reason, metrics=metrics or {}, walltime=done.clock.walltime())


class _Progress:
    """What an attempt has produced so far, so that any stage can end it with an outcome."""

    def __init__(self, request: TrialRequest, clock: PhaseClock) -> None:
        self.request = request
        self.clock = clock
        self.measurement: Measurement | None = None
        self.rungs: list[RungReport] = []
        self.device: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.limit_mb = request.memory_limit_mb
        self.peak_mb = 0.0

    def check_memory(self, what: str, peak_mb: float = 0.0) -> None:
        """After each phase under a memory limit: raise if it went over, else keep the peak."""
        if self.limit_mb is None:
            return
        if peak_mb > self.limit_mb:
            raise MemoryBudgetExceeded(what, peak_mb, self.limit_mb, "measured")
        self.peak_mb = max(self.peak_mb, peak_mb, check_peak(self.limit_mb, what))

    def constraint_values(self) -> dict[str, float]:
        """The values of the limits this worker enforces, as far as they are known."""
        values = {} if self.limit_mb is None else {TRIAL_MEMORY: self.peak_mb}
        if self.request.latency_target_ms is not None and self.measurement is not None:
            values[LATENCY_TARGET] = self.measurement.latency_ms
        return values

    def stamp(self) -> None:
        """Timings so far: this process's CPU time (the device cost) and its wait for the
        exclusive device lock."""
        self.timings["cpu_s"] = time.process_time()
        self.timings["device_wait_s"] = DEVICE.waited_s

    def timed(self, ask: Ask) -> Ask:
        """``ask`` with its round trip to the coordinator timed as idle."""
        def timed_ask(kind: EventKind, payload: Any) -> Decision:
            start = time.perf_counter()
            try:
                return ask(kind, payload)
            finally:
                self.clock.answered(time.perf_counter() - start)
        return timed_ask

    def outcome(self, status: Outcome, reason: str = "", **fields: Any) -> TrialOutcome:
        self.stamp()
        fields.setdefault("constraint_values", self.constraint_values())
        return TrialOutcome(self.request.number, self.request.attempt, status, reason,
                            measurement=self.measurement, rungs=tuple(self.rungs),
                            device=self.device, timings=self.timings,
                            walltime=self.clock.walltime(), **fields)


def _run(request: TrialRequest, data: DataPayload, ask: Ask, done: _Progress) -> TrialOutcome:
    config = Config.from_dict(request.config)
    limit = request.memory_limit_mb
    with enforce_limit(limit, config) if limit is not None else contextlib.nullcontext():
        return _stages(request, data, ask, config, done)


def _stages(request: TrialRequest, data: DataPayload, ask: Ask, config: Config,
            done: _Progress) -> TrialOutcome:
    """Measure, train in rungs, evaluate: each stage reports and obeys the answer."""
    started, clock = time.perf_counter(), done.clock
    state, rungs, start = _initial_state(config, request)
    fit = None
    with clock.phase("latency"), DEVICE.exclusive():
        if request.latency_target_ms is not None:
            fit = fit_step_budget(state.model, config, request.latency_target_ms,
                                  request.latency_runs)
            config = state.config = fit.config  # trained, evaluated and saved with it
        latency = measuring.latency(state.model, config, request.latency_runs, fit,
                                    request.latency_rounds)
    measurement = done.measurement = measuring.measure(state.model, config, latency, fit,
                                                       start, clock)
    done.device = device_fingerprint()
    done.timings["measure_s"] = measurement.seconds
    done.check_memory("measurement", max(measurement.train_mb, measurement.sample_mb))
    decision = ask(EventKind.MEASURED, measurement)
    if not decision.proceed:
        return done.outcome(Outcome.PRUNED, decision.reason)
    train_start = time.perf_counter()
    guard = clock.step_guard(lambda: len(state.history))
    for rung in rungs:
        train(state, data.train, data.val, until=rung, callback=_stop_if_orphaned, guard=guard,
              labels=data.labels)
        with clock.shared("validate"):
            done.rungs.append(_rung_report(state, data, time.perf_counter() - train_start))
        done.check_memory(f"training to step {rung}")
        decision = ask(EventKind.RUNG, done.rungs[-1])
        if not decision.proceed:
            done.timings["train_s"] = time.perf_counter() - train_start
            with clock.phase("write"):
                files = _checkpoint_files(state) if decision.keep_weights else {}
            return done.outcome(Outcome.PRUNED, decision.reason, artifacts=files)
    done.timings["train_s"] = time.perf_counter() - train_start
    return _complete(state, config, data, request, done, started)


def _complete(state: TrainState, config: Config, data: DataPayload, request: TrialRequest,
              done: _Progress, started: float) -> TrialOutcome:
    """Evaluate, package the artifacts, and add the measured latency to the worker's table."""
    assert done.measurement is not None
    measurement = done.measurement
    eval_start = time.perf_counter()
    quality = _evaluate(state, config, data, request, done.clock)
    done.check_memory("evaluation")
    done.timings["eval_s"] = time.perf_counter() - eval_start
    if measurement.disturbed:
        remeasure_start = time.perf_counter()
        with done.clock.phase("latency"), DEVICE.exclusive():
            measurement = done.measurement = measuring.remeasure(
                state.model, config, request.latency_runs, measurement, request.latency_rounds)
        done.timings["remeasure_s"] = time.perf_counter() - remeasure_start
    values = {"fid": quality.record.fid, "latency_ms": measurement.latency_ms,
              "peak_mem_mb": measurement.memory_mb(request.memory)}
    metrics = _metrics(request, config, values, measurement, quality.to_dict(), done.rungs,
                       done.device)
    with done.clock.phase("write"):
        artifacts = {"samples.png": grid_png(quality.grid), **_checkpoint_files(state)}
    table = None
    if request.table_dir:
        with done.clock.phase("table"), DEVICE.exclusive():
            table = observe_trial(state.model, config, request.table_dir,
                                  request.device_class, measurement.latency_ms)
    done.timings["total_s"] = time.perf_counter() - started
    done.stamp()
    metrics["timings"] = done.timings
    with done.clock.phase("write"):
        artifacts["metrics.json"] = json.dumps(metrics, indent=2).encode()
    return done.outcome(Outcome.COMPLETED, values=values, metrics=metrics, artifacts=artifacts,
                        latency_table=table)


def _initial_state(config: Config, request: TrialRequest
                   ) -> tuple[TrainState, tuple[int, ...], dict[str, Any]]:
    """A fresh training state, or the parent's weights morphed to this architecture.

    Returns:
        The state, the rungs to train to (the parent's shorter budget when inherited) and
        how the weights began (``Measurement.start``).
    """
    parent = request.parent
    if parent is None:
        return init_state(config), request.rungs, {"status": "fresh"}
    parent_unet = Config.from_dict(parent.config).unet
    params = inherit(parent_unet, _load_params(parent.weights), config.unet)
    if params is None:
        return init_state(config), request.rungs, {
            "status": "fresh", "parent": parent.number,
            "reason": "not reachable from the parent's architecture by engine.model.morph"}
    return inherited_state(config, params), parent.rungs, {
        "status": "inherited", "parent": parent.number, "train_steps": parent.rungs[-1]}


def _load_params(weights: bytes) -> dict[str, Any]:
    """A parameter tree from the bytes of a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parent.safetensors"
        path.write_bytes(weights)
        tensors = mx.load(str(path))
    assert isinstance(tensors, dict)
    return dict(tree_unflatten(list(tensors.items())))


def _rung_report(state: TrainState, data: DataPayload, elapsed_s: float) -> RungReport:
    """The proxy at the step just reached; a rung between two ``eval_every`` points (whose
    history holds an older point, or none) is evaluated here, on the same fixed batch."""
    history = tuple((p.step, p.val_loss) for p in state.history)
    point = state.history[-1] if state.history else None
    if point is not None and point.step == state.step:
        return RungReport(point.step, point.val_loss, point.train_loss, elapsed_s, history)
    val_loss = validation_loss(state.ema_model(), state.config, data.val, data.val_labels)
    pending = state.pending_losses
    train_loss = sum(pending) / len(pending) if pending else float("nan")
    return RungReport(state.step, val_loss, train_loss, elapsed_s,
                      (*history, (state.step, val_loss)))


def _evaluate(state: TrainState, config: Config, data: DataPayload, request: TrialRequest,
              clock: PhaseClock) -> QualityResult:
    """FID/KID of the EMA model on the shipped feature network, with the grid's samples
    (:func:`engine.measure.evaluate`, its two halves timed apart)."""
    n, seed = request.fid_samples, request.eval_seed
    with clock.shared("fid"):
        fake = sample_images(state.ema_model(), config, n, seed)
    with clock.shared("features"):
        net = FeatureNetwork.from_bytes(data.feature_net)
        record = evaluate_quality(fake, data.real, net, n, seed)
    return QualityResult(record, fake[:request.grid_images])


def _metrics(request: TrialRequest, config: Config, values: dict[str, float],
             measurement: Measurement, quality: dict[str, Any], rungs: list[RungReport],
             device: dict[str, Any]) -> dict[str, Any]:
    return {"trial": request.number, "attempt": request.attempt, "values": values,
            "config": config.to_dict(), "params": param_count(config.unet),
            "flops": flops(config.unet), "measurement": asdict(measurement),
            "quality": quality, "rungs": [asdict(r) for r in rungs], "device": device}


def _checkpoint_files(state: TrainState) -> dict[str, bytes]:
    """The training state's checkpoint as ``checkpoint/<file>`` bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(state, Path(tmp) / "checkpoint")
        return {f"checkpoint/{path.name}": path.read_bytes() for path in sorted(folder.iterdir())}


def _stop_if_orphaned(_: Any) -> None:
    if os.getppid() != _PARENT:
        os._exit(3)


_PARENT = os.getppid()


def _die_with_parent() -> None:
    """Exit when the worker dies, so that a retried trial never runs twice at once."""
    global _PARENT
    _PARENT = os.getppid()  # a fork of the warm process has a new parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watch() -> None:
        while os.getppid() == _PARENT:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


class _Channel:
    """The child's side of the pipe: report, then block for the coordinator's answer."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ask(self, kind: EventKind, payload: Any) -> Decision:
        self.conn.send(("event", kind, payload))
        tag, decision = self.conn.recv()
        assert tag == "decision", tag
        assert isinstance(decision, Decision)
        return decision


def serve(conn: Connection, launched_at: float, mode: str,
          data: DataPayload | None = None) -> int:
    """Run the one trial that comes over ``conn`` and send its outcome back.

    Args:
        conn: the pipe to the worker.
        launched_at: ``time.time()`` when the worker launched this process.
        mode: how it started (``spawn``, or ``fork`` of the warm process).
        data: the study's data when this process already holds it (forked); else it comes
            with the request.
    """
    clock = PhaseClock(DEVICE)
    clock.add("start", time.time() - launched_at)
    _die_with_parent()
    start = time.perf_counter()
    tag, request, sent = conn.recv()
    assert tag == "run", tag
    clock.add("transfer", time.perf_counter() - start)
    payload = sent if sent is not None else data
    assert payload is not None, "no data came with the request"
    outcome = run_trial(request, payload, _Channel(conn).ask, clock)
    if outcome.walltime is not None:
        closed = outcome.walltime.closed(time.time() - launched_at)
        outcome = replace(outcome, walltime=replace(closed, mode=mode))
    conn.send(("done", outcome, time.time()))
    conn.close()
    return 0


def main(argv: list[str]) -> int:
    """Entry point of the child: ``python -m workers.trial FD [LAUNCHED_AT]``."""
    launched_at = float(argv[1]) if len(argv) > 1 else time.time()
    return serve(Connection(int(argv[0])), launched_at, "spawn")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
