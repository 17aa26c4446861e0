"""The body of one trial, run in a child process of a worker (``python -m workers.trial FD``).

Measure latency and peak memory, train in rungs (reporting each to the coordinator and
obeying its continue/prune answer), evaluate FID/KID, draw a sample grid and save the
checkpoint. Everything goes back as a :class:`TrialOutcome` with the files as bytes.

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
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import engine  # noqa: F401  (binds an optimised BLAS before mlx loads)
from workers.records import (
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

Ask = Callable[[EventKind, Any], Decision]
"""Sends a report to the coordinator and blocks for its answer."""


def run_trial(request: TrialRequest, data: DataPayload, ask: Ask) -> TrialOutcome:
    """Run one attempt of one trial; candidate errors become FAILED outcomes, not exceptions.

    Under a memory limit (``request.memory_limit_mb``) a candidate predicted or measured
    over it ends at once as PRUNED, with its peak as the ``trial_memory_mb`` constraint value.
    """
    from engine.memory import MemoryBudgetExceeded
    from engine.train import TrainingDiverged

    done = _Progress(request)
    try:
        return _run(request, data, ask, done)
    except MemoryBudgetExceeded as err:
        return done.outcome(Outcome.PRUNED, f"over the trial memory limit: {err}",
                            constraint_values={TRIAL_MEMORY: err.needed_mb})
    except TrainingDiverged as err:
        return _failed(request, f"diverged: {err}")
    except Exception as err:  # noqa: BLE001 (the candidate's own error: FAILED, no retry)
        tail = traceback.format_exc(limit=-3)
        return _failed(request, f"{type(err).__name__}: {err}", {"traceback": tail})


def _failed(request: TrialRequest, reason: str, metrics: dict[str, Any] | None = None
            ) -> TrialOutcome:
    return TrialOutcome(request.number, request.attempt, Outcome.FAILED, reason=reason,
                        metrics=metrics or {})


class _Progress:
    """What an attempt has produced so far, so that any stage can end it with an outcome."""

    def __init__(self, request: TrialRequest) -> None:
        self.request = request
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
        from engine.memory import MemoryBudgetExceeded, check_peak

        if peak_mb > self.limit_mb:
            raise MemoryBudgetExceeded(what, peak_mb, self.limit_mb, "measured")
        self.peak_mb = max(self.peak_mb, peak_mb, check_peak(self.limit_mb, what))

    def outcome(self, status: Outcome, reason: str = "", **fields: Any) -> TrialOutcome:
        self.timings["cpu_s"] = time.process_time()  # this process's CPU time: the device cost
        fields.setdefault("constraint_values",
                          {} if self.limit_mb is None else {TRIAL_MEMORY: self.peak_mb})
        return TrialOutcome(self.request.number, self.request.attempt, status, reason,
                            measurement=self.measurement, rungs=tuple(self.rungs),
                            device=self.device, timings=self.timings, **fields)


def _run(request: TrialRequest, data: DataPayload, ask: Ask, done: _Progress) -> TrialOutcome:
    from engine.config import Config
    from engine.memory import enforce_limit

    config = Config.from_dict(request.config)
    limit = request.memory_limit_mb
    with enforce_limit(limit, config) if limit is not None else contextlib.nullcontext():
        return _stages(request, data, ask, config, done)


def _stages(request: TrialRequest, data: DataPayload, ask: Ask, config: Any, done: _Progress
            ) -> TrialOutcome:
    """Measure, train in rungs, evaluate: each stage reports and obeys the answer."""
    from engine.bench import device_fingerprint
    from engine.train import init_state, train

    started = time.perf_counter()
    state = init_state(config)
    measurement = done.measurement = _measure(state.model, config, request.latency_runs)
    done.device = device_fingerprint()
    done.timings["measure_s"] = measurement.seconds
    done.check_memory("measurement", max(measurement.train_mb, measurement.sample_mb))
    decision = ask(EventKind.MEASURED, measurement)
    if not decision.proceed:
        return done.outcome(Outcome.PRUNED, decision.reason)
    train_start = time.perf_counter()
    for rung in request.rungs:
        train(state, data.train, data.val, until=rung, callback=_stop_if_orphaned)
        done.rungs.append(_rung_report(state, data, time.perf_counter() - train_start))
        done.check_memory(f"training to step {rung}")
        decision = ask(EventKind.RUNG, done.rungs[-1])
        if not decision.proceed:
            done.timings["train_s"] = time.perf_counter() - train_start
            return done.outcome(Outcome.PRUNED, decision.reason)
    done.timings["train_s"] = time.perf_counter() - train_start
    eval_start = time.perf_counter()
    quality, grid = _evaluate(state, config, data, request)
    done.check_memory("evaluation")
    done.timings["eval_s"] = time.perf_counter() - eval_start
    values = {"fid": quality["fid"], "latency_ms": measurement.latency_ms,
              "peak_mem_mb": measurement.memory_mb(request.memory)}
    metrics = _metrics(request, config, values, measurement, quality, done.rungs, done.device)
    artifacts = _artifacts(state, grid, metrics)
    done.timings["total_s"] = time.perf_counter() - started
    done.timings["cpu_s"] = time.process_time()
    metrics["timings"] = done.timings
    artifacts["metrics.json"] = json.dumps(metrics, indent=2).encode()
    return done.outcome(Outcome.COMPLETED, values=values, metrics=metrics, artifacts=artifacts)


def _rung_report(state: Any, data: DataPayload, elapsed_s: float) -> RungReport:
    """The proxy at the step just reached; a rung between two ``eval_every`` points (whose
    history holds an older point, or none) is evaluated here, on the same fixed batch."""
    from engine.train import validation_loss

    point = state.history[-1] if state.history else None
    if point is not None and point.step == state.step:
        return RungReport(point.step, point.val_loss, point.train_loss, elapsed_s)
    val_loss = validation_loss(state.ema_model(), state.config, data.val)
    pending = state.pending_losses
    train_loss = sum(pending) / len(pending) if pending else float("nan")
    return RungReport(state.step, val_loss, train_loss, elapsed_s)


def _measure(model: Any, config: Any, runs: int) -> Measurement:
    """Latency of the full sampling loop at batch 1, then peak memory of sampling and training."""
    from engine.bench import sampling_latency, sampling_peak_mb, training_peak_mb

    start = time.perf_counter()
    latency = sampling_latency(model, config, batch=1, runs=runs)
    sample_mb = sampling_peak_mb(model, config, 1)
    train_mb = training_peak_mb(config)
    return Measurement(latency.median_ms, latency.spread, latency.samples_ms, train_mb,
                       sample_mb, time.perf_counter() - start)


def _evaluate(state: Any, config: Any, data: DataPayload, request: TrialRequest
              ) -> tuple[dict[str, Any], bytes]:
    from engine.experiment import sample_images
    from engine.features import FeatureNetwork
    from engine.images import grid_png
    from engine.metrics import evaluate_quality

    model = state.ema_model()
    fake = sample_images(model, config, request.fid_samples, request.eval_seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feature_net.safetensors"
        path.write_bytes(data.feature_net)
        net = FeatureNetwork.load(path)
    quality = evaluate_quality(fake, data.real, net, request.fid_samples, request.eval_seed)
    return asdict(quality), grid_png(fake[: request.grid_images])


def _metrics(request: TrialRequest, config: Any, values: dict[str, float],
             measurement: Measurement, quality: dict[str, Any], rungs: list[RungReport],
             device: dict[str, Any]) -> dict[str, Any]:
    from engine.cost import flops, param_count

    return {"trial": request.number, "attempt": request.attempt, "values": values,
            "config": config.to_dict(), "params": param_count(config.unet),
            "flops": flops(config.unet), "measurement": asdict(measurement),
            "quality": quality, "rungs": [asdict(r) for r in rungs], "device": device}


def _artifacts(state: Any, grid: bytes, metrics: dict[str, Any]) -> dict[str, bytes]:
    from engine.io import save_checkpoint

    files = {"samples.png": grid}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(state, Path(tmp) / "checkpoint")
        for path in sorted(folder.iterdir()):
            files[f"checkpoint/{path.name}"] = path.read_bytes()
    return files


def _stop_if_orphaned(_: Any) -> None:
    if os.getppid() != _PARENT:
        os._exit(3)


_PARENT = os.getppid()


def _die_with_parent() -> None:
    """Exit when the worker dies, so that a retried trial never runs twice at once."""
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


def main(argv: list[str]) -> int:
    """Entry point of the child: ``python -m workers.trial FD``."""
    _die_with_parent()
    conn = Connection(int(argv[0]))
    tag, request, data = conn.recv()
    assert tag == "run", tag
    outcome = run_trial(request, data, _Channel(conn).ask)
    conn.send(("done", outcome))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
