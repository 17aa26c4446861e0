"""The coordinator's view of the workers: one actor per unit of the device resource.

The pool starts an actor for every free unit of :data:`workers.RESOURCE` in the cluster
(so a node that joins mid-study gets work), keeps one long-poll for reports outstanding
per actor, and turns a dead actor into a :class:`Death` for its trial. With
:mod:`search.run.cluster` (how a cluster is started, joined and watched) it is the only
module of ``search`` that talks to Ray.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, RayActorError, RayError

from search.run.cluster import check_cluster, loopback_only
from workers.actor import RESOURCE, start_worker
from workers.records import Decision, Event, Outcome, TrialOutcome, TrialRequest, WorkerSetup

NAMESPACE = "diffnas"
REFRESH_S = 2.0
POLL_S = 1.0


class Kind(enum.Enum):
    EVENTS = "events"
    RESULT = "result"
    PROFILE = "profile"


@dataclass
class Worker:
    """A live actor and what it is doing; ``trial`` is the number it runs, or ``None``."""

    name: str
    actor: Any
    profile: dict[str, Any] = field(default_factory=dict)
    trial: int | None = None
    attempt: int = 0
    since: float = 0.0
    run_ref: Any = None
    events_ref: Any = None
    finished: int = 0
    busy_s: float = 0.0

    @property
    def idle(self) -> bool:
        return self.trial is None


@dataclass(frozen=True)
class Reports:
    worker: Worker
    events: list[Event]


@dataclass(frozen=True)
class Result:
    worker: Worker
    outcome: TrialOutcome


@dataclass(frozen=True)
class Death:
    """A worker died; ``trial`` is what it was running (if anything)."""

    worker: Worker
    trial: int | None
    attempt: int
    reason: str


Completion = Reports | Result | Death


def local_worker_count() -> int:
    """Default workers for an embedded cluster: the one GPU of a Mac, or one per CPU core
    (each trial's BLAS runs one thread) up to 8."""
    if sys.platform == "darwin":
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def connect(address: str | None, workers: int | None, insecure: bool = False) -> bool:
    """Join the cluster at ``address`` once :func:`~search.run.cluster.check_cluster` lets
    us, or start an embedded one; returns whether we connected (``False``: this process
    already was).

    Args:
        address: ``HOST:PORT`` of a head's GCS, ``"auto"`` (the one on this machine), or
            ``None`` for an embedded cluster.
        workers: device units of an embedded cluster (default :func:`local_worker_count`).
        insecure: join a cluster that does not require token authentication.

    Raises:
        ValueError: the cluster cannot be reached or joined, or refuses us (one line).
    """
    if ray.is_initialized():
        return False
    return start_ray(check_cluster(address, insecure) if address else None, workers)


def start_ray(gcs: str | None, workers: int | None) -> bool:
    """Join the checked cluster at ``gcs``, or start an embedded one that listens on
    loopback only; returns whether we connected (``False``: this process already was).

    Raises:
        ValueError: ``ray.init`` failed to join ``gcs``, or the embedded cluster did not
            start (a raylet that died or missed Ray's start-up limit).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                              "include_dashboard": False}
    if gcs:
        try:
            ray.init(address=gcs, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ValueError(f"cannot join the Ray cluster at {gcs}: {err}") from None
        return True
    n = workers or local_worker_count()
    # address="local": always a new embedded cluster, even when another Ray instance runs
    # on this machine (or RAY_ADDRESS points at one); without --address we never join one.
    try:
        with loopback_only():
            ray.init(address="local", num_cpus=max(n, os.cpu_count() or 1),
                     resources={RESOURCE: n}, **kwargs)
    except Exception as err:  # noqa: BLE001 (Ray raises a bare Exception when a node dies
        ray.shutdown()        # or misses its start-up limit on a loaded machine)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the embedded Ray cluster did not start: {first} (nothing was "
                         "run; the same command resumes)") from None
    return True


class WorkerPool:
    """Actors on every free device unit, up to ``max_workers``; see the module docstring.

    With a ``setup``, a new actor first prepares it (its latency table) and counts as
    started once that is done; its profile then carries the table.
    """

    def __init__(self, label: str, max_workers: int | None = None,
                 setup: WorkerSetup | None = None) -> None:
        self.label = label
        self.max_workers = max_workers
        self.setup = setup
        self.workers: dict[str, Worker] = {}
        self.dead: list[Worker] = []
        self._pending: dict[Any, Worker] = {}  # profile ref -> worker not yet started
        self._refs: dict[Any, tuple[Kind, Worker]] = {}
        self._spawned = 0
        self._refreshed = 0.0

    def capacity(self) -> int:
        """Device units in the cluster now (capped by ``max_workers``)."""
        total = int(ray.cluster_resources().get(RESOURCE, 0))
        return total if self.max_workers is None else min(total, self.max_workers)

    def refresh(self, force: bool = False) -> None:
        """Start actors for device units that have none (a joining node), at most every 2 s."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        for _ in range(self.capacity() - len(self.workers) - len(self._pending)):
            self._spawn()

    def _spawn(self) -> None:
        """Start one actor, under the next name that no live actor holds: the actors of a
        run that just ended on this cluster release their names asynchronously."""
        while True:
            name = f"{self.label}-w{self._spawned}"
            self._spawned += 1
            try:
                actor = start_worker(name, NAMESPACE)
                break
            except ActorAlreadyExistsError:
                continue
        worker = Worker(name, actor)
        ref = actor.prepare.remote(self.setup) if self.setup else actor.profile.remote()
        self._pending[ref] = worker
        self._refs[ref] = (Kind.PROFILE, worker)

    def idle(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.idle]

    def starting(self) -> int:
        """Actors spawned that have not reported their profile yet."""
        return len(self._pending)

    def dispatch(self, worker: Worker, request: TrialRequest, data_ref: Any) -> None:
        """Start ``request`` on an idle ``worker``."""
        assert worker.idle, f"{worker.name} is busy with trial {worker.trial}"
        worker.trial, worker.attempt, worker.since = request.number, request.attempt, time.time()
        worker.run_ref = worker.actor.run_trial.remote(request, data_ref)
        self._refs[worker.run_ref] = (Kind.RESULT, worker)

    def decide(self, worker: Worker, key: tuple[int, int, int], decision: Decision) -> None:
        worker.actor.decide.remote(key, decision)

    def wait(self, timeout_s: float) -> list[Completion]:
        """Whatever finished within ``timeout_s``: reports, results, deaths (in that order)."""
        if not self._refs:
            time.sleep(timeout_s)
            return []
        refs = list(self._refs)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        order = {Kind.PROFILE: 0, Kind.EVENTS: 1, Kind.RESULT: 2}
        ready.sort(key=lambda r: order[self._refs[r][0]])
        out: list[Completion] = []
        for ref in ready:
            if ref in self._refs:
                out.extend(self._collect(ref))
        return out

    def _collect(self, ref: Any) -> list[Completion]:
        kind, worker = self._refs.pop(ref)
        try:
            value = ray.get(ref)
        except RayActorError as err:
            return self._died(worker, err)
        except RayError as err:  # the call failed but the actor lives: fail the attempt only
            if kind is Kind.PROFILE:
                ray.kill(worker.actor)
                return self._died(worker, err)
            if kind is Kind.EVENTS:
                self._poll(worker)
                return []
            value = TrialOutcome(worker.trial or 0, worker.attempt, Outcome.CRASHED,
                                 reason=f"worker {worker.name} failed: {_short(err)}",
                                 worker=worker.name)
        if kind is Kind.PROFILE:
            self._pending.pop(ref, None)
            worker.profile = value
            self.workers[worker.name] = worker
            self._poll(worker)
            return []
        if kind is Kind.EVENTS:
            self._poll(worker)
            return [Reports(worker, value)] if value else []
        worker.busy_s += time.time() - worker.since
        worker.finished += 1
        worker.trial, worker.run_ref = None, None
        return [Result(worker, value)]

    def _poll(self, worker: Worker) -> None:
        worker.events_ref = worker.actor.next_events.remote(POLL_S)
        self._refs[worker.events_ref] = (Kind.EVENTS, worker)

    def _died(self, worker: Worker, err: BaseException) -> list[Completion]:
        """Forget every ref of a dead worker; report its trial once."""
        for ref in [r for r, (_, w) in self._refs.items() if w is worker]:
            del self._refs[ref]
        self._pending = {r: w for r, w in self._pending.items() if w is not worker}
        if self.workers.pop(worker.name, None) is None:
            return []  # never started (or already reported)
        self.dead.append(worker)
        reason = f"worker {worker.name} died: {_short(err)}"
        return [Death(worker, worker.trial, worker.attempt, reason)]

    def find(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def shutdown(self) -> None:
        """Stop every actor this pool started (their trials' child processes die with them)."""
        for worker in [*self.workers.values(), *self._pending.values()]:
            try:
                ray.kill(worker.actor)
            except RayError:
                pass
        self.workers.clear()
        self._pending.clear()
        self._refs.clear()


def _short(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text}"[:300]


def list_workers() -> list[dict[str, Any]]:
    """Device profiles of every running diffnas worker in the cluster (for ``diffnas workers``),
    each with ``current``: the trial it runs."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE]
    out: list[dict[str, Any]] = []
    for name in sorted(names):
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            profile: dict[str, Any]
            current: dict[str, Any] | None
            profile, current = ray.get([actor.profile.remote(), actor.current.remote()],
                                       timeout=10)
        except (RayError, ValueError):
            continue
        out.append({**profile, "current": current})
    return out


def device_nodes() -> list[dict[str, Any]]:
    """Alive nodes and how many device units each offers."""
    return [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress", ""),
             "devices": int(n.get("Resources", {}).get(RESOURCE, 0))}
            for n in ray.nodes() if n.get("Alive")]


def workers_text(address: str | None, insecure: bool = False) -> str:
    """The ``diffnas workers`` report: device units per node, and each running worker.

    Raises:
        ValueError: no Ray cluster at ``address``, or one we may not join (see
            :func:`connect`).
    """
    started = connect(address or "auto", None, insecure)
    try:
        nodes, running = device_nodes(), list_workers()
    finally:
        if started:
            ray.shutdown()
    units = sum(n["devices"] for n in nodes)
    lines = [f"{len(nodes)} node(s), {units} device unit(s) ({RESOURCE})"]
    lines += [f"  node {n['node_id'][:12]} {n['address']}: {n['devices']}" for n in nodes]
    if not running:
        lines.append("no diffnas workers running (workers live while a search runs)")
    for w in running:
        current = w.get("current")
        doing = f"trial {current['number']}" if current else "idle"
        lines.append(f"{w['worker']}: {w['backend']} {w['chip']}, {w['memory_gb']} GB, mlx "
                     f"{w['mlx']}, blas {w['blas']}, host {w['host']}, device class "
                     f"{w.get('device_class', '-')} -- {doing}")
    return "\n".join(lines)
