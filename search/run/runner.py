"""``run_search``: open or resume a study, connect to Ray, and run the coordinator.

This is what ``diffnas search`` calls; a notebook can call it too::

    from search import SearchOptions

    from search import run_search
    result = run_search(SearchOptions(space="smoke"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import BaseStorage
from sqlalchemy.exc import SQLAlchemyError

from search import pareto
from search.hooks.hardware import worker_setup
from search.pruning.base import Pruner
from search.pruning.registry import make_pruner
from search.run.cluster import EXIT_LOST, Watch, check_cluster
from search.run.coordinator import Coordinator, Tally
from search.run.dataset import build_payload
from search.run.progress import Progress, Silent, setup_step
from search.space import SearchSpace, load_space
from search.storage import artifacts, lease, paths
from search.storage import study as st
from workers.actor import RESOURCE
from workers.records import DataPayload


@dataclass(frozen=True)
class SearchOptions:
    """Everything ``diffnas search`` accepts. ``None`` means: the space's (or a default)."""

    space: str | Path | None = None  # preset name or space file; None resumes the stored one
    study: str | None = None  # default: the space's name
    storage: str | None = None  # any Optuna storage URL; default: SQLite under results/
    results: Path = Path("results")
    trials: int | None = None  # target count of finished trials (counts earlier runs)
    workers: int | None = None  # at most this many workers (embedded: this many)
    address: str | None = None  # join this Ray cluster instead of starting one
    insecure: bool = False  # join a cluster that does not require token authentication
    sampler: str | None = None  # tpe | nsga2 (new studies only)
    seed: int | None = None  # new studies only
    pruner: str | None = None  # none | constraints | mo-asha (default: the space's)
    max_retries: int = 2  # retries of a trial whose process or worker died
    timeout_s: float | None = None  # stop asking for new trials after this long
    max_latency_ms: float | None = None  # each trial samples with the most steps that fit

    def __repr__(self) -> str:
        return _redacted_repr(self)


@dataclass(frozen=True)
class SearchResult:
    """What a search run leaves: counts for this run and the study's front afterwards."""

    study: str
    storage: str
    results: Path
    resumed: bool
    requeued: tuple[int, ...]
    finished: int
    target: int
    complete: int
    pruned: int
    failed: int
    front: tuple[int, ...]
    hypervolume: float
    wall_s: float
    overhead_s: tuple[float, ...] = field(default=())
    durations_s: tuple[float, ...] = field(default=())

    def __repr__(self) -> str:
        return _redacted_repr(self)


def _redacted_repr(record: SearchOptions | SearchResult) -> str:
    """The dataclass repr, with any password in the storage URL shown as ``***`` (a
    notebook prints options and results)."""
    shown = {f.name: getattr(record, f.name) for f in fields(record)}
    if shown["storage"] is not None:
        shown["storage"] = st.redact(shown["storage"])
    body = ", ".join(f"{name}={value!r}" for name, value in shown.items())
    return f"{type(record).__name__}({body})"


def run_search(options: SearchOptions, progress: Progress | None = None) -> SearchResult:
    """Create or resume a study and run trials until its target count has finished.

    Raises:
        SpaceError: the space file is invalid (nothing is written).
        StudyError: bad storage URL or study name, unknown study without a space,
            mismatched space, a damaged storage, another coordinator holding the study, or
            a results folder that belongs to another study.
        ValueError: no device workers in the cluster, a cluster that cannot be reached or
            joined safely (before the storage is opened), or a bad dataset.
    """
    start = time.time()
    _check_options(options)
    space = load_space(options.space) if options.space is not None else None
    name = options.study or (space.name if space else None)
    if name is None:
        raise st.StudyError("give --study NAME to resume, or a space (--preset/--space)")
    st.check_name(name)
    results = Path(options.results)
    payload = _checked_inputs(space, options, results, progress) if space else None
    # A cluster we cannot join fails here, in seconds, and leaves no study behind; an
    # embedded one starts after the storage is opened (a storage error need not wait).
    gcs = check_cluster(options.address, options.insecure) if options.address else None
    url = options.storage or st.default_storage(results)
    with _storage_errors(url):
        storage = st.open_storage(url, create=space is not None)
        if space is None:  # resuming by name: the stored space decides, before any write
            space = st.stored_space(st.load_existing(storage, name))
            payload = _checked_inputs(space, options, results, progress)
        study, space, resumed = st.open_study(storage, name, space, options.sampler,
                                              options.seed)
        held = lease.acquire(study)  # before anything else writes: one coordinator a study
        try:
            run = Run(storage, results, artifacts.claim(results, study), held)
            requeued, target, tally = _search(study, space, options, run, payload, gcs,
                                              progress or Silent())
        finally:
            held.release()
        return _result(study, space, url, results, resumed, requeued, target, tally,
                       time.time() - start)


@dataclass(frozen=True)
class Run:
    """Where this run writes, and the lease it holds while it does."""

    storage: BaseStorage
    results: Path
    folder: Path  # results/<study>/, claimed by the study
    held: lease.Lease


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A storage that fails mid-run (a lost server, a full disk) is one line, not a trace."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:
        raise st.StudyError(st.failure("storage {url} failed", url, err)) from None


def _search(study: optuna.Study, space: SearchSpace, options: SearchOptions, run: Run,
            payload: DataPayload | None, gcs: str | None, progress: Progress
            ) -> tuple[tuple[int, ...], int, Tally | None]:
    """Recover the stale trials, then run until the target; returns (requeued, target,
    tally)."""
    pruner = make_pruner(options.pruner or space.study.pruner, space)
    requeued = tuple(st.recover_stale(study, run.storage))
    target = space.study.trials if options.trials is None else options.trials
    study.set_user_attr("target", target)
    study.set_user_attr("pruner", pruner.name)  # the latest run's; each decision names its own
    if st.finished_count(study) >= target:
        return requeued, target, None
    assert payload is not None
    return requeued, target, _run(study, space, options, run, payload, gcs, pruner,
                                  target, progress)


def _check_options(options: SearchOptions) -> None:
    """Refuse option values no search can use, before anything is read or written.

    Raises:
        ValueError: naming the option (its CLI flag) and the value.
    """
    bad = [(flag, value, why) for flag, value, ok, why in (
        ("--trials", options.trials, options.trials is None or options.trials >= 1, ">= 1"),
        ("--workers", options.workers, options.workers is None or options.workers >= 1,
         ">= 1"),
        ("--max-retries", options.max_retries, options.max_retries >= 0, ">= 0"),
        ("--timeout", options.timeout_s, options.timeout_s is None or options.timeout_s > 0,
         "> 0"),
        ("--seed", options.seed, options.seed is None or options.seed >= 0, ">= 0"),
        ("--max-latency-ms", options.max_latency_ms,
         options.max_latency_ms is None or options.max_latency_ms > 0, "> 0"),
    ) if not ok]
    if bad:
        flag, value, why = bad[0]
        raise ValueError(f"{flag}: must be {why}, got {value:g}")
    paths.check_dir(Path(options.results), "--results")
    if options.storage is not None:
        st.check_local_path(options.storage)


def _checked_inputs(space: SearchSpace, options: SearchOptions, results: Path,
                    progress: Progress | None) -> DataPayload:
    """Validate the options and load the dataset before the storage is touched."""
    make_pruner(options.pruner or space.study.pruner, space)
    return build_payload(space.data, results / "feature-nets", progress,
                         fid_samples=space.evaluate.fid_samples,
                         num_classes=conditional_classes(space))


def conditional_classes(space: SearchSpace) -> int:
    """The fewest classes a class-conditional candidate of ``space`` has; 0 if none is."""
    param = next((p for p in space.params if p.name == "unet.num_classes"), None)
    if param is None:
        return 0
    if param.searched and not param.choices:
        values = [int(param.low), int(param.high)]
    else:
        values = [int(v) for v in (param.choices or (param.value,))]
    return min((v for v in values if v > 0), default=0)


def _run(study: optuna.Study, space: SearchSpace, options: SearchOptions, run: Run,
         payload: DataPayload, gcs: str | None, pruner: Pruner, target: int,
         progress: Progress) -> Tally:
    import ray

    from search.run.pool import WorkerPool, start_ray

    results = run.results
    for partial in run.folder.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)  # a killed coordinator's half-written trial
    joining = f"joining the Ray cluster at {options.address}" if options.address else (
        "starting Ray (embedded)")
    with setup_step(progress, joining):
        started = start_ray(gcs, options.workers)
    run.held.renew(force=True)  # starting Ray can take a while
    watch = Watch.start(Abandon(run.held), remote=gcs is not None) if started else None
    pool = None
    try:
        if not ray.cluster_resources().get(RESOURCE):
            raise ValueError(f"the Ray cluster offers no {RESOURCE!r} resource: start each "
                             f"node with --resources='{{\"{RESOURCE}\": 1}}'")
        channels = int(payload.train.shape[-1])
        pool = WorkerPool(label=study.study_name, max_workers=options.workers,
                          setup=worker_setup(space, channels, results))
        pool.refresh(force=True)
        deadline = None if options.timeout_s is None else time.time() + options.timeout_s
        coordinator = Coordinator(study, space, pool, ray.put(payload), channels, results,
                                  pruner, target, options.max_retries, progress, deadline,
                                  options.max_latency_ms, run.held)
        return coordinator.run()
    finally:
        if watch is not None:
            watch.stop()
        progress.close()
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


class Abandon:
    """What a cluster that dies under the search does to it: one line on stderr, the lease
    released (so the same command resumes at once, from any host), and exit status
    :data:`~search.run.cluster.EXIT_LOST`. It runs on the watch's thread: the main thread
    is stuck in Ray, and Ray would soon end the process with a log dump itself."""

    def __init__(self, held: lease.Lease | None = None) -> None:
        self.held = held

    def __call__(self, what: str) -> None:
        lead = "\n" if sys.stderr.isatty() else ""  # below a live progress line
        print(f"{lead}diffnas: error: {what}; run the same command again to resume the "
              "study", file=sys.stderr, flush=True)
        if self.held is not None:
            with contextlib.suppress(Exception):  # a storage that failed too: it times out
                self.held.release()
        os._exit(EXIT_LOST)


def _result(study: optuna.Study, space: SearchSpace, url: str, results: Path, resumed: bool,
            requeued: tuple[int, ...], target: int, tally: Tally | None, wall_s: float
            ) -> SearchResult:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and st.feasible(t)]
    points = st.objective_values(complete)
    mask = pareto.pareto_mask(points) if len(points) else np.zeros(0, bool)
    ref = space.study.reference_point or (
        tuple(pareto.default_reference(points)) if len(points) else ())
    counts = {s: sum(1 for t in trials if t.state == s and st.is_finished(t))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    return SearchResult(
        study=study.study_name, storage=url, results=results, resumed=resumed,
        requeued=requeued, finished=sum(counts.values()), target=target,
        complete=counts[TrialState.COMPLETE], pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL],
        front=tuple(t.number for t, keep in zip(complete, mask) if keep),
        hypervolume=float(pareto.hypervolume(points, ref)) if len(points) else 0.0,
        wall_s=wall_s,
        overhead_s=tuple(tally.overheads) if tally else (),
        durations_s=tuple(tally.durations) if tally else ())
