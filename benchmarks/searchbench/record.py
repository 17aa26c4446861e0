#!/usr/bin/env python3
"""Record the table: every planned config trained to its full budget as a real trial.

  python benchmarks/searchbench/record.py [--bench main|heldout]
      [--configs benchmarks/searchbench/configs.json]
      [--out benchmarks/searchbench/results.jsonl] [--jobs N] [--limit K] [--longest-first]

``--bench heldout`` reads heldout/configs.json and appends to heldout/results.jsonl (the
held-out space); ``--configs``/``--out`` override either benchmark's files.

Each config of configs.json (plan.py) runs through ``workers.trial.run_trial`` -- the
trial body of a real search -- in a fresh process of its own, with an ask callback that
always answers continue (no pruning). The callback notes the process's CPU time when the
trial reports its measurement and each rung, which is what the trial would have cost had
a pruner stopped it there (the coordinator counts a trial's device-seconds as the CPU
time of its process, ``timings.cpu_s``; a fresh process per trial keeps that true here).

One JSON line per finished config is appended to ``--out`` (see :func:`row`); configs
already there (same id, same space) are skipped, so an interrupted recording resumes.
``--jobs N`` runs N trials at once in separate processes, each with one BLAS thread.
Timed measurements still take the machine's device lock one at a time
(``workers.device_lock``), so latency is measured with the other trials paused.

This step imports only ``engine``, ``workers.trial``/``workers.records`` and numpy (no
ray, optuna or ``search``): it runs on a machine that has just numpy and the mlx wheels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# engine/ and workers/ of this checkout, on a machine where the project is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# One BLAS thread per trial process: N jobs share the cores without oversubscription.
# Set before engine binds the BLAS (and inherited by the spawned trial processes).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from engine.data.datasets import load_dataset
from engine.quality.features import feature_network_for
from workers.records import DataPayload, Decision, EventKind, TrialOutcome, TrialRequest
from workers.trial import DEVICE, run_trial

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "diffnas"
BENCHES = {"main": (HERE / "configs.json", HERE / "results.jsonl"),
           "heldout": (HERE / "heldout" / "configs.json", HERE / "heldout" / "results.jsonl")}
"""Each benchmark's plan and table (plan.py's ``--bench``)."""


class PlanError(ValueError):
    """configs.json is missing, corrupt or incomplete."""


def load_plan(path: Path) -> dict[str, Any]:
    """The plan document, checked for the keys this step reads.

    Raises:
        PlanError: unreadable, not JSON, or a key is missing (named).
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: {err}") from None
    for key in ("space_sha256", "data", "evaluate", "limits", "configs"):
        if key not in doc:
            raise PlanError(f"{path}: no {key!r} (write it with plan.py)")
    return doc


def recorded_ids(path: Path, space_sha256: str) -> set[int]:
    """Ids of the configs already in the results file for this space.

    Raises:
        PlanError: a line is not JSON (an interrupted write), with its line number.
    """
    if not path.is_file():
        return set()
    ids = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            raise PlanError(f"{path}:{number}: not a JSON line ({err}); remove that line "
                            "to resume") from None
        if row.get("space_sha256") == space_sha256:
            ids.add(int(row["id"]))
    return ids


def work_estimate(entry: dict[str, Any], evaluate: dict[str, Any]) -> float:
    """A config's relative compute, for ordering only: forward FLOPs times the images it
    trains on plus the network evaluations of its FID samples."""
    config = entry["config"]
    train = int(config["train"]["steps"]) * int(config["train"]["batch_size"])
    sample = int(evaluate["fid_samples"]) * int(config["schedule"]["steps"])
    return float(entry["cost"]["flops"]) * (3 * train + sample)


def payload(data: dict[str, Any], cache: Path) -> DataPayload:
    """The dataset and feature network every trial gets, as a search ships them."""
    dataset = load_dataset(data["dataset"], image_size=int(data["image_size"]))
    train, val = dataset.split(float(data["val_fraction"]), int(data["split_seed"]))
    net = feature_network_for(dataset, cache)
    path = cache / f"searchbench-feature-net-{os.getpid()}.safetensors"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        net.save(path)
        weights = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    return DataPayload(name=dataset.name, train=train.images, val=val.images,
                       real=dataset.images, feature_net=weights, train_labels=train.labels,
                       val_labels=val.labels)


def request_for(entry: dict[str, Any], evaluate: dict[str, Any]) -> TrialRequest:
    return TrialRequest(int(entry["id"]), 0, entry["config"], tuple(entry["rungs"]),
                        fid_samples=int(evaluate["fid_samples"]),
                        grid_images=int(evaluate["grid_images"]),
                        latency_runs=int(evaluate["latency_runs"]),
                        memory=str(evaluate["memory"]), eval_seed=int(evaluate["seed"]))


Decide = Callable[[EventKind, Any, float], Decision]
"""Answers a trial's report, given the process's CPU time when it reported."""


def record_one(entry: dict[str, Any], plan: dict[str, Any], data: DataPayload,
               decide: Decide | None = None) -> dict[str, Any]:
    """Run one config in this process; its table row.

    Args:
        entry: the planned config.
        plan: the plan document (evaluation settings and limits).
        data: the study's data.
        decide: answers each report (confirm.py's live trials); without it, every answer is
            continue and the config trains to its full budget.
    """
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    marks: dict[str, Any] = {"rungs": {}}

    def ask(kind: EventKind, report: Any) -> Decision:
        cpu_s = time.process_time()
        if kind is EventKind.MEASURED:
            marks["measured"] = cpu_s
        elif kind is EventKind.RUNG:
            marks["rungs"][report.step] = cpu_s
        return Decision() if decide is None else decide(kind, report, cpu_s)

    outcome = run_trial(request_for(entry, plan["evaluate"]), data, ask)
    return row(entry, plan, outcome, start_cpu, marks, time.perf_counter() - start_wall)


def _decide_over(conn: Connection) -> Decide:
    """A live trial's answers: each report goes over ``conn``, the answer comes back."""
    def decide(kind: EventKind, report: Any, cpu_s: float) -> Decision:
        conn.send(("event", kind, report, cpu_s))
        answer = conn.recv()
        assert isinstance(answer, Decision)
        return answer
    return decide


def live_trial(conn: Connection, entry: dict[str, Any], plan: dict[str, Any],
               data: DataPayload, lock_dir: str | None = None) -> None:
    """One config in this fresh process, each report answered over ``conn`` (live.py's
    side asks the arm's pruner); sends ``("done", row)`` at the end. ``lock_dir``: a
    device lock of its own (a study pinned to a core of its own)."""
    if lock_dir is not None:
        DEVICE.folder = Path(lock_dir)
    conn.send(("done", record_one(entry, plan, data, _decide_over(conn))))
    conn.close()


def constraint_values(known: dict[str, float], limits: dict[str, float]) -> dict[str, float]:
    """``value / limit - 1`` for each limit whose value is known; > 0 violates (as
    ``search.pruning.base.constraint_values``, which this step may not import)."""
    return {name: float(known[name]) / float(limit) - 1.0 for name, limit in limits.items()
            if name in known}


def row(entry: dict[str, Any], plan: dict[str, Any], outcome: TrialOutcome, start_cpu: float,
        marks: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One table row: the config, what each stage reported, and the CPU-seconds the trial's
    process had used when it reached each stage (``cpu_s``: ``start`` when the trial began,
    ``measured`` at stage 1, ``end`` with the outcome; ``rungs[i].cpu_s`` at each rung)."""
    m = outcome.measurement
    known = {"params": float(entry["cost"]["params"]), "flops": float(entry["cost"]["flops"])}
    measurement = None
    if m is not None:
        measurement = {k: v for k, v in asdict(m).items() if k not in ("budget", "start")}
        known.update(latency_ms=m.latency_ms, memory_mb=m.memory_mb(plan["evaluate"]["memory"]))
    rungs = [{"step": r.step, "val_loss": r.val_loss, "train_loss": r.train_loss,
              "elapsed_s": r.elapsed_s, "cpu_s": marks["rungs"].get(r.step)}
             for r in outcome.rungs]
    return {"id": int(entry["id"]), "space_sha256": plan["space_sha256"],
            "params": entry["params"], "status": outcome.status.value,
            "reason": outcome.reason, "cost": entry["cost"], "measurement": measurement,
            "rungs": rungs,
            "cpu_s": {"start": start_cpu, "measured": marks.get("measured"),
                      "end": outcome.timings.get("cpu_s")},
            "values": outcome.values, "quality": outcome.metrics.get("quality"),
            "constraints": constraint_values(known, plan["limits"]),
            "timings": outcome.timings, "device": outcome.device, "wall_s": wall_s}


def _child(entry: dict[str, Any], plan: dict[str, Any], data: DataPayload,
           cores: Any = None) -> dict[str, Any]:
    """One config in this fresh process; with ``cores`` (a queue of free core numbers), on
    a core of its own, and with a device lock of its own."""
    if cores is None:
        return record_one(entry, plan, data)
    core = cores.get()
    try:
        # Many jobs on a many-core machine: one core each, so a timed measurement shares
        # its core with nothing of ours, and a lock of its own, since the machine-wide
        # lock's exclusive hold (one measurement at a time) would pause every other job.
        os.sched_setaffinity(0, {core})
        DEVICE.folder = Path(tempfile.mkdtemp(prefix=f"searchbench-lock-{core}-"))
        return record_one(entry, plan, data)
    finally:
        cores.put(core)


def record(plan: dict[str, Any], out: Path, jobs: int, limit: int | None,
           cache: Path = CACHE, core_per_job: bool = False, longest_first: bool = False) -> int:
    """Run the configs not yet in ``out`` (at most ``limit``), ``jobs`` at a time, each in a
    fresh process (with ``core_per_job``, pinned to a core of its own); append each row as
    it finishes. With ``longest_first``, the costliest by :func:`work_estimate` start first
    (a shorter run on many cores: no long config is left to start last). Returns how many
    were recorded."""
    done = recorded_ids(out, plan["space_sha256"])
    todo = [e for e in plan["configs"] if int(e["id"]) not in done]
    if longest_first:
        todo.sort(key=lambda e: -work_estimate(e, plan["evaluate"]))
    todo = todo[:limit]
    print(f"{len(done)} recorded, {len(todo)} to run with {jobs} jobs", flush=True)
    if not todo:
        return 0
    data = payload(plan["data"], cache)
    context = multiprocessing.get_context("spawn")  # a fresh process: its CPU time is the trial's
    count = 0
    cores = None
    if core_per_job:
        cores = context.Manager().Queue()
        for core in sorted(os.sched_getaffinity(0))[:jobs]:
            cores.put(core)
    with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool, \
            out.open("a") as sink:
        futures = {pool.submit(_child, e, plan, data, cores): e["id"] for e in todo}
        for future in as_completed(futures):
            result = future.result()
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            count += 1
            print(f"config {result['id']}: {result['status']} {result['reason'][:80]} "
                  f"({result['wall_s']:.1f} s wall, {result['cpu_s']['end'] or 0:.1f} "
                  f"CPU-s) [{count}/{len(todo)}]", flush=True)
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="main",
                   help="the benchmark whose plan and table --configs and --out default to")
    p.add_argument("--configs", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--jobs", type=int, default=1, help="trials at once, one process each")
    p.add_argument("--limit", type=int, help="record at most this many more configs")
    p.add_argument("--cache", type=Path, default=CACHE, help="feature network cache")
    p.add_argument("--core-per-job", action="store_true",
                   help="pin each job to a core of its own, with a device lock of its own "
                   "(a machine with more cores than --jobs)")
    p.add_argument("--longest-first", action="store_true",
                   help="start the costliest configs (FLOPs x images) first")
    args = p.parse_args(argv)
    configs, out = BENCHES[args.bench]
    configs, out = args.configs or configs, args.out or out
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be >= 1")
    if args.core_per_job and args.jobs > len(os.sched_getaffinity(0)):
        p.error(f"--core-per-job: --jobs {args.jobs} is more than the "
                f"{len(os.sched_getaffinity(0))} cores this process may use")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit {args.limit}: must be >= 0")
    try:
        plan = load_plan(configs)
        record(plan, out, args.jobs, args.limit, args.cache, args.core_per_job,
               args.longest_first)
    except PlanError as err:
        print(f"record: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
