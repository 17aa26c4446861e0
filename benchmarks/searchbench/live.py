"""The confirmation's live part: a table whose lookup trains, the studies run on it, and
their summary (confirm.py is the command).

A :class:`LiveTable` has the interface :mod:`arms` uses of ``recorded.Table``; its
``nearest`` trains the proposal as a real trial (``record.live_trial``: the trial body of
a search in a fresh process) and returns the fresh row. The trial stops for real where the
arm's pruner stops it: the live table asks a pruner of the same class
(``search.pruning.make_pruner``), fed the same reports in the same order, at stage 0,
after the measurement and at every rung, so a pruned proposal costs the device-seconds it
really used. The arm then plays the row it got, as in the replay.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import record
from arms import Played, PrunerStopper, play, run_arm
from recorded import Row, Table, read_rows
from replay import curve_on, hv_steps

from engine.model.cost import flops, param_count
from search import pareto
from search.pruning.base import Cost
from search.pruning.registry import PRUNERS, make_pruner
from search.space import SearchSpace
from workers.records import OBJECTIVES, DataPayload, Decision, EventKind

ARMS = ("tpe", "nsga2", "random", "constraints", "mo-asha")
"""The arms a live study can run: the Optuna ones whose stopper is a diffnas pruner."""
FRACTIONS = (0.25, 0.5, 1.0)
FINISHED = ("completed", "failed")
"""Rows that hold everything a later stopper could ask: reused for a repeated config."""


class LiveTable(Table):
    """A table that trains what it is asked for: ``nearest`` runs the proposal as a real
    trial, stopped where the arm's pruner class stops it, and returns the fresh row.

    Rows are appended in trial order (``rows[i].id`` is the trial number); every trial is
    appended to ``path`` as a row of the table's format before it is used.
    """

    def __init__(self, space: SearchSpace, plan: dict[str, Any], data: DataPayload, arm: str,
                 path: Path, lock_dir: str | None = None) -> None:
        self.space, self.plan, self.data, self.arm = space, plan, data, arm
        self.path, self.lock_dir = path, lock_dir
        self.rows: list[Row] = []
        self.synthetic = False
        self.limits = space.constraints.limits()
        self.stopper = PrunerStopper(make_pruner(arm if arm in PRUNERS else "none", space))
        self.stored = {r.id: r for r in read_rows(path)[0]} if _has_rows(path) else {}
        self.finished: dict[str, Row] = {}
        self.trained = self.reused = 0
        self.stops: list[str] = []

    def nearest(self, params: dict[str, Any]) -> tuple[int, float]:
        """Train ``params`` (or reuse its stored row); the index of its row, distance 0."""
        number = len(self.rows)
        key = json.dumps(params, sort_keys=True)
        row = self._reuse(number, params, key)
        if row is None:
            row = self._train(number, params)
            self.trained += 1
        else:
            self.reused += 1
        if row.status in FINISHED:
            self.finished[key] = row
        self.rows.append(row)
        return number, 0.0

    def _reuse(self, number: int, params: dict[str, Any], key: str) -> Row | None:
        """A row already trained for these parameters, walked through the stopper so that
        its state is what it would have been; None if it stops past what the row holds."""
        row = self.stored.get(number)
        row = row if row is not None and row.params == params else self.finished.get(key)
        if row is None:
            return None
        stop, _ = play(row, number, self.stopper)
        if stop == "failed" and row.status not in FINISHED:
            return None
        row = replace(row, id=number)
        if number not in self.stored:
            self._write(_stored_doc(row, self.arm, stop))
        self.stops.append(stop)
        return row

    def _train(self, number: int, params: dict[str, Any]) -> Row:
        entry = self._entry(number, params)
        c = entry["cost"]
        row = Row(number, params, "pruned", Cost(c["params"], c["flops"], c["train_steps"]),
                  None, 0.0, (), (), 0.0, None)
        if not self.stopper.stage0(number, row):
            self.stops.append("stage0")
            self._write(_stored_doc(row, self.arm, "stage0"))
            return self._last()
        doc, stop = self._run(number, row, entry)
        self.stops.append(stop)
        self._write({**doc, "arm": self.arm, "stop": stop})
        return self._last()

    def _entry(self, number: int, params: dict[str, Any]) -> dict[str, Any]:
        """The proposal as a planned config (plan.py's fields)."""
        config = self.space.decode(params)
        steps = config.train.steps
        return {"id": number, "params": params, "config": config.to_dict(),
                "cost": {"params": param_count(config.unet), "flops": flops(config.unet),
                         "train_steps": steps},
                "rungs": list(self.space.rungs.steps(steps))}

    def _run(self, number: int, row: Row, entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The trial in a fresh process, each report answered by the stopper; its row
        document and where it stopped."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(target=record.live_trial,
                                args=(theirs, entry, self.plan, self.data, self.lock_dir))
        child.start()
        stop = "complete"
        try:
            while True:
                try:
                    message = ours.recv()
                except EOFError:
                    child.join()
                    raise RuntimeError(f"{self.arm} trial {number}: its process ended without "
                                       f"a row (exit code {child.exitcode})") from None
                if message[0] == "done":
                    doc = message[1]
                    break
                _, kind, report, cpu_s = message
                row, proceed, where = self._ask(number, row, kind, report, cpu_s,
                                                len(entry["rungs"]))
                stop = stop if proceed else where
                ours.send(Decision(proceed, "" if proceed else f"{self.arm}: stop at {where}"))
        finally:
            child.join()
        return doc, stop if doc["status"] != "failed" else "failed"

    def _ask(self, number: int, row: Row, kind: EventKind, report: Any, cpu_s: float,
             rungs: int) -> tuple[Row, bool, str]:
        """The stopper's answer to one report, with the row as far as it is known."""
        if kind is EventKind.MEASURED:
            row = replace(row, measurement=report, cpu_measured=cpu_s)
            return row, self.stopper.stage1(number, row), "stage1"
        row = replace(row, rungs=(*row.rungs, report), rung_cpu=(*row.rung_cpu, cpu_s))
        last = len(row.rungs) == rungs
        return row, self.stopper.rung(number, row, len(row.rungs) - 1, last), f"rung {report.step}"

    def _write(self, doc: dict[str, Any]) -> None:
        with self.path.open("a") as sink:
            sink.write(json.dumps(doc) + "\n")

    def _last(self) -> Row:
        """The row just written, read back as the replay reads a table."""
        return read_rows(self.path)[0][-1]


def _has_rows(path: Path) -> bool:
    return path.is_file() and bool(path.read_text().strip())


def _stored_doc(row: Row, arm: str, stop: str) -> dict[str, Any]:
    """A row that was not trained here (stopped at stage 0, or reused), in the table's
    format: what the replay needs to play it."""
    m = row.measurement
    return {"id": row.id, "params": row.params, "status": row.status, "arm": arm,
            "stop": stop, "reason": "stage 0" if stop == "stage0" else "reused",
            "cost": {"params": row.cost.params, "flops": row.cost.flops,
                     "train_steps": row.cost.train_steps},
            "measurement": None if m is None else {
                "latency_ms": m.latency_ms, "latency_spread": m.latency_spread,
                "latency_samples_ms": list(m.latency_samples_ms), "train_mb": m.train_mb,
                "sample_mb": m.sample_mb, "seconds": m.seconds},
            "rungs": [{"step": r.step, "val_loss": r.val_loss, "train_loss": r.train_loss,
                       "elapsed_s": r.elapsed_s, "cpu_s": c}
                      for r, c in zip(row.rungs, row.rung_cpu)],
            "cpu_s": {"start": 0.0, "measured": row.cpu_measured if m else None,
                      "end": row.cpu_end},
            "values": None if row.values is None else dict(zip(OBJECTIVES, row.values))}


def run_study(job: dict[str, Any]) -> dict[str, Any]:
    """One (arm, seed) study in this process, on a core of its own when ``job["cores"]``
    (a queue of free core numbers) is given; what it played and how."""
    cores = job["cores"]
    core = None if cores is None else cores.get()
    try:
        lock_dir = None
        if core is not None:
            # As record.py: one core per study, and a device lock of its own, so a timed
            # measurement pauses nothing of the other studies.
            os.sched_setaffinity(0, {core})
            lock_dir = tempfile.mkdtemp(prefix=f"searchbench-confirm-lock-{core}-")
        arm, seed = job["arm"], job["seed"]
        path = job["out_dir"] / f"trials-{arm}-{seed}.jsonl"
        live = LiveTable(job["space"], job["plan"], job["data"], arm, path, lock_dir)
        start = time.perf_counter()
        played = run_arm(arm, live, seed, job["budget"])
        return {"arm": arm, "seed": seed, "played": played, "live_stops": live.stops,
                "trained": live.trained, "reused": live.reused,
                "wall_s": time.perf_counter() - start}
    finally:
        if core is not None:
            cores.put(core)


def run_studies(jobs: list[dict[str, Any]], data: DataPayload, workers: int,
                core_per_job: bool) -> list[dict[str, Any]]:
    """Every study, ``workers`` at a time, each in a fresh process; results in ``jobs``'
    order."""
    context = multiprocessing.get_context("spawn")
    cores = None
    if core_per_job:
        cores = context.Manager().Queue()
        for core in sorted(os.sched_getaffinity(0))[:workers]:
            cores.put(core)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_study, {**job, "data": data, "cores": cores})
                   for job in jobs]
        for future in as_completed(futures):
            r = future.result()
            results[(r["arm"], r["seed"])] = r
            print(f"{r['arm']} seed {r['seed']}: {len(r['played'])} trials ({r['trained']} "
                  f"trained, {r['reused']} reused), {sum(p.cost for p in r['played']):.0f} "
                  f"device-s, {r['wall_s']:.0f} s wall", flush=True)
    return [results[(job["arm"], job["seed"])] for job in jobs]


def hv_at(played: list[Played], reference: np.ndarray, budget: float) -> list[float]:
    """The hypervolume of the trials finished within each share of :data:`FRACTIONS`."""
    grid = np.array([f * budget for f in FRACTIONS])
    return [float(v) for v in curve_on(grid, *hv_steps(played, reference))]


def ranking(means: dict[str, float]) -> list[str]:
    """Arms from the highest mean hypervolume down."""
    return sorted(means, key=lambda a: -means[a])


def summarise(results: list[dict[str, Any]], recorded: Table, budget: float
              ) -> dict[str, Any]:
    """Per study: its stops, cost and hypervolume, live and replayed on the recorded table
    with the same arm, seed and budget; per fraction: the two rankings."""
    reference = pareto.default_reference(recorded.points())
    studies = []
    for r in results:
        replayed = run_arm(r["arm"], recorded, r["seed"], budget)
        stops = [p.stop for p in r["played"]]
        studies.append({
            "arm": r["arm"], "seed": r["seed"], "trials": len(stops),
            "stops": {k: sum(s.split()[0] == k for s in stops)
                      for k in ("complete", "stage0", "stage1", "rung", "failed")},
            "stop_mismatches": sum(a != b for a, b in zip(stops, r["live_stops"])),
            "trained": r["trained"], "reused": r["reused"], "wall_s": r["wall_s"],
            "device_s": sum(p.cost for p in r["played"]),
            "hv": hv_at(r["played"], reference, budget),
            "replay_hv": hv_at(replayed, reference, budget)})
    arms = list(dict.fromkeys(s["arm"] for s in studies))
    rankings = []
    for i, fraction in enumerate(FRACTIONS):
        live = {a: float(np.mean([s["hv"][i] for s in studies if s["arm"] == a])) for a in arms}
        rep = {a: float(np.mean([s["replay_hv"][i] for s in studies if s["arm"] == a]))
               for a in arms}
        rankings.append({"fraction": fraction, "live": live, "replay": rep,
                         "holds": ranking(live) == ranking(rep)})
    return {"budget": budget, "reference": reference.tolist(), "fractions": list(FRACTIONS),
            "studies": studies, "rankings": rankings}


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1)


def markdown(doc: dict[str, Any], command: str, wall_s: float) -> str:
    """The summary: one line per study, then the rankings."""
    heads = " | ".join(f"HV at {f:.0%} live (replay)" for f in FRACTIONS)
    lines = [(f"| arm | seed | trials: complete / stage 0 / stage 1 / rung / failed | trained "
              f"(reused) | stop mismatches | device-s | wall s | {heads} |"),
             "|---" * (7 + len(FRACTIONS)) + "|"]
    for s in doc["studies"]:
        st = " / ".join(str(s["stops"][k]) for k in ("complete", "stage0", "stage1", "rung",
                                                     "failed"))
        hv = " | ".join(f"{a:.4g} ({b:.4g})" for a, b in zip(s["hv"], s["replay_hv"]))
        lines.append(f"| {s['arm']} | {s['seed']} | {s['trials']}: {st} | {s['trained']} "
                     f"({s['reused']}) | {s['stop_mismatches']} | {s['device_s']:.0f} | "
                     f"{s['wall_s']:.0f} | {hv} |")
    ranks = []
    for r in doc["rankings"]:
        live = " > ".join(f"{a} {r['live'][a]:.4g}" for a in ranking(r["live"]))
        rep = " > ".join(f"{a} {r['replay'][a]:.4g}" for a in ranking(r["replay"]))
        ranks.append(f"- {r['fraction']:.0%} of the budget: live {live}; replay {rep}: "
                     f"the replay's ranking {'holds' if r['holds'] else 'does not hold'}.")
    shown = ", ".join(f"{v:.4g}" for v in doc["reference"])
    return (f"# Search benchmark: confirmation with real trials\n\n`{command}` "
            f"({wall_s:.0f} s wall)\n\nBudget {doc['budget']:.0f} device-s per study (the "
            f"replay's rule times the budget share); reference point (fid, latency_ms, "
            f"peak_mem_mb) ({shown}), the replay's; one worker per study; replay columns: "
            f"the same arm, seed and budget on the recorded table.\n\n"
            + "\n".join(lines) + "\n\nMean hypervolume over seeds:\n\n" + "\n".join(ranks)
            + "\n")


