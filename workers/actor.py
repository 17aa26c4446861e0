"""The Ray actor: one per device, claimed through a custom resource; thin by design.

It reports its device profile (with its latency table, :mod:`workers.table`), runs one
trial at a time in a child process (:mod:`workers.process`) and relays the trial's
reports to the coordinator, which long-polls :meth:`DeviceWorker.next_events` and answers
with :meth:`DeviceWorker.decide`.
The worker never touches the study storage: it returns plain records.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from workers.forkserver import default_launcher
from workers.process import run_in_child
from workers.records import (
    DataPayload,
    Decision,
    Event,
    EventKind,
    TrialOutcome,
    TrialRequest,
    WorkerSetup,
)
from workers.table import build_in_child, device_class

RESOURCE = "diffnas_device"
"""The custom resource a worker claims; give each Mac (or GPU) one unit of it."""


def device_profile() -> dict[str, Any]:
    """This process's device: chip or CPU, backend, memory, MLX and BLAS, host, pid, its
    device class (:func:`workers.table.device_class`), MLX's kernel cache (the folder
    that the worker's trial processes share, :mod:`engine.device.kernel_cache`) and whether
    ``mx.compile`` compiles (:mod:`engine.device.compile_mode`)."""
    import engine  # noqa: F401  (binds an optimised BLAS and sets the kernel cache before mlx loads)
    from engine.device import compile_mode, kernel_cache
    from engine.device.bench import device_fingerprint

    profile = dict(device_fingerprint())
    profile.update(kernel_cache.describe())
    profile.update(compile_mode.STATUS)
    profile.update(host=socket.gethostname(), pid=os.getpid())
    labels: dict[str, str] = {}
    try:
        import ray

        context = ray.get_runtime_context()
        profile["node_id"] = context.get_node_id()
        labels = {str(k): str(v) for k, v in context.get_node_labels().items()}
    except Exception:  # noqa: BLE001 (outside Ray: the bare class in a test)
        profile["node_id"] = ""
    profile["device_class"] = device_class(profile, labels)
    return profile


class DeviceWorker:
    """Runs trials on this device, one at a time; see the module docstring."""

    def __init__(self, name: str = "") -> None:
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._launcher = default_launcher()
        self._profile = device_profile()
        self._events: queue.Queue[Event] = queue.Queue()
        self._answers: dict[tuple[int, int, int], queue.Queue[Decision]] = {}
        self._lock = threading.Lock()
        self._running: dict[str, Any] | None = None
        self._seq = 0
        self._table_dir = ""
        started_at = _process_started()
        self._walltime = {"started_at": started_at,
                          "actor_start_s": max(0.0, time.time() - started_at),
                          "table_s": 0.0, "mode": self._launcher.mode}
        self._idle_since = time.perf_counter()

    def profile(self) -> dict[str, Any]:
        """Device profile; also the readiness probe the coordinator waits on.

        ``walltime``: this worker's own costs, ``started_at`` (its process start, epoch
        seconds), ``actor_start_s`` (from then to ready), ``table_s`` (its latency table) and
        ``mode`` (how it starts trial processes).
        """
        return {**self._profile, "worker": self.name, "walltime": dict(self._walltime)}

    def prepare(self, setup: WorkerSetup) -> dict[str, Any]:
        """Build or load this device class's latency table, before the first trial.

        Returns:
            The profile plus ``latency_table`` (a table dict, or None with
            ``latency_error`` saying why); the readiness probe when a study keeps tables.
        """
        start = time.perf_counter()
        table, self._table_dir, error = build_in_child(
            list(setup.calibration), setup.cache_dir, self._profile["device_class"])
        self._walltime["table_s"] = time.perf_counter() - start
        self._idle_since = time.perf_counter()
        return {**self.profile(), "latency_table": table, "latency_error": error}

    def current(self) -> dict[str, Any] | None:
        """The trial now running here: ``{"number", "attempt", "pid", "since"}`` or ``None``."""
        return None if self._running is None else dict(self._running)

    def run_trial(self, request: TrialRequest, data: DataPayload) -> TrialOutcome:
        """Run one attempt in a child process; blocks until it ends."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"worker {self.name} is already running a trial")
        entered, queued_s = time.time(), time.perf_counter() - self._idle_since
        try:
            self._seq = 0
            self._running = {"number": request.number, "attempt": request.attempt,
                             "pid": None, "since": time.time()}
            request = replace(request, device_class=self._profile["device_class"],
                              table_dir=self._table_dir)
            outcome = run_in_child(request, data, lambda k, p, n: self._relay(request, k, p, n),
                                   on_start=lambda pid: self._started(request, pid),
                                   launcher=self._launcher)
            return _finished(outcome, self.name, entered, request.sent_at, queued_s)
        finally:
            self._running = None
            self._idle_since = time.perf_counter()
            self._lock.release()

    def next_events(self, timeout_s: float = 1.0) -> list[Event]:
        """Every event waiting now; blocks up to ``timeout_s`` for the first one."""
        try:
            events = [self._events.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def decide(self, key: tuple[int, int, int], decision: Decision) -> None:
        """The coordinator's answer to the event ``key``; unknown keys are ignored."""
        answer = self._answers.get(tuple(key))  # type: ignore[arg-type]
        if answer is not None:
            answer.put(decision)

    def _started(self, request: TrialRequest, pid: int) -> None:
        if self._running is not None:
            self._running["pid"] = pid
        self._emit(request, EventKind.STARTED, {"pid": pid}, needs_decision=False)

    def _relay(self, request: TrialRequest, kind: EventKind, payload: Any,
               needs_decision: bool) -> Decision:
        event = self._emit(request, kind, payload, needs_decision)
        if not needs_decision:
            return Decision()
        try:
            return self._answers[event.key].get()
        finally:
            del self._answers[event.key]

    def _emit(self, request: TrialRequest, kind: EventKind, payload: Any,
              needs_decision: bool) -> Event:
        self._seq += 1
        event = Event(request.number, request.attempt, self._seq, kind, payload, self.name,
                      needs_decision)
        if needs_decision:
            self._answers[event.key] = queue.Queue(maxsize=1)
        self._events.put(event)
        return event


def _finished(outcome: TrialOutcome, name: str, entered: float, sent_at: float,
              queued_s: float) -> TrialOutcome:
    """The outcome with this worker's name, and its wall time with the dispatch (from the
    coordinator's send to this call: Ray's call and the data's arrival) and the idle time
    before it."""
    walltime = outcome.walltime
    if walltime is not None:
        dispatch_s = max(0.0, entered - sent_at) if sent_at else 0.0  # clocks of two hosts
        walltime = replace(walltime.plus(transfer_s=dispatch_s), queued_s=queued_s)
    return replace(outcome, worker=name, walltime=walltime)


def _process_started() -> float:
    """When this process started (epoch seconds)."""
    # psutil comes with ray; imported here because the trial processes import this package
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process().create_time())


def start_worker(name: str, namespace: str | None = None, max_concurrency: int = 4) -> Any:
    """Start a ``DeviceWorker`` actor claiming one unit of :data:`RESOURCE`; returns its handle.

    ``num_cpus=0``: the trial runs in the worker's child process, outside Ray's CPU
    accounting, and the device (one Mac's GPU, or one CPU slot) is what is scarce. The
    actor is threaded so that reports and answers flow while a trial runs.
    """
    import ray

    options: dict[str, Any] = {"num_cpus": 0, "resources": {RESOURCE: 1},
                               "max_concurrency": max_concurrency, "max_restarts": 0,
                               "max_task_retries": 0, "name": name, "namespace": namespace}
    return ray.remote(DeviceWorker).options(**options).remote(name)
