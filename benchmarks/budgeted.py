"""What the pruning and evolution benchmarks share: studies on a budget of device-seconds,
run once and cached as JSON, the hypervolume followed against the device-seconds spent,
and their command line.

A trial's device-seconds are its recorded ``timings.cpu_s`` (CPU time of its child
process, which a busy shared machine inflates far less than wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from search import pareto
from search.run import runner
from search.run.coordinator import Coordinator
from search.storage import record as rec
from search.storage import study as st


class BudgetedCoordinator(Coordinator):
    """Stops asking for trials once the finished ones have spent ``budget_s`` device-seconds."""

    budget_s = math.inf

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent_s = 0.0

    def _record(self, run: Any, outcome: Any) -> None:
        super()._record(run, outcome)
        self.spent_s += float(outcome.timings.get("cpu_s", 0.0))

    def _may_ask(self) -> bool:
        return self.spent_s < self.budget_s and super()._may_ask()


def install(budget_s: float) -> None:
    """Make every ``runner.run_search`` of this process stop at ``budget_s`` device-seconds
    (the budget, nothing else, differs from a plain search)."""
    BudgetedCoordinator.budget_s = budget_s
    runner.Coordinator = BudgetedCoordinator  # type: ignore[misc]


def device_seconds(t: FrozenTrial) -> float:
    return float(t.user_attrs.get(rec.TIMINGS, {}).get("cpu_s", 0.0))


@dataclass(kw_only=True)
class BudgetRun:
    """One finished study, reduced to what a report needs; a benchmark adds its own fields."""

    seed: int
    wall_s: float
    spent: list[float] = field(default_factory=list)  # cumulative device-s, finish order
    points: list[list[float] | None] = field(default_factory=list)  # feasible COMPLETE
    device: dict[str, Any] = field(default_factory=dict)

    def add(self, t: FrozenTrial) -> bool:
        """Count the finished trial ``t`` (the next in finish order); returns whether it is
        feasible and COMPLETE, i.e. a point of the front's hypervolume."""
        ok = t.state == TrialState.COMPLETE and st.feasible(t)
        self.spent.append((self.spent[-1] if self.spent else 0.0) + device_seconds(t))
        self.points.append(list(t.values) if ok else None)
        self.device = t.user_attrs.get(rec.DEVICE, self.device)
        return ok


R = TypeVar("R", bound=BudgetRun)


def finished_in_order(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials, in the order they finished."""
    return sorted((t for t in trials if st.is_finished(t)),
                  key=lambda t: (t.datetime_complete, t.number))


def run_cached(work: Path, name: str, kind: type[R],
               summarise: Callable[[list[FrozenTrial], float], R], **options: Any) -> R:
    """Study ``name`` searched under ``work`` (``options``: :class:`runner.SearchOptions`
    fields) and summarised from its trials and wall seconds; a study that finished before
    is read back from ``work/<name>.json`` instead (the script resumes after a stop)."""
    cache = work / f"{name}.json"
    if cache.is_file():  # fields a newer version derives are dropped
        known = {f.name for f in fields(kind)}
        return kind(**{k: v for k, v in json.loads(cache.read_text()).items() if k in known})
    search = runner.SearchOptions(study=name, results=work, storage=st.default_storage(work),
                                  **options)
    start = time.time()
    runner.run_search(search)
    study = st.load_existing(st.open_storage(search.storage or "", create=False), name)
    run = summarise(study.get_trials(), time.time() - start)
    cache.write_text(json.dumps(run.__dict__))
    return run


def run_interleaved(seeds: Sequence[int], arms: Sequence[str],
                    study: Callable[[str, int], R]) -> list[R]:
    """``study(arm, seed)`` for every seed and arm, seed by seed, so that load drift on a
    shared machine hits every arm alike; a line per study as it ends."""
    runs = []
    for seed in seeds:
        for arm in arms:
            runs.append(study(arm, seed))
            r = runs[-1]
            print(f"{arm} seed {seed}: {len(r.spent)} trials, {r.spent[-1]:.0f} device-s, "
                  f"{r.wall_s:.0f} s wall", flush=True)
    return runs


def hv_curves(runs: Sequence[R], arm: Callable[[R], str]
              ) -> tuple[np.ndarray, dict[tuple[str, int], np.ndarray]]:
    """One reference point for all ``runs`` (10% past the worst feasible point of any), and
    each run's hypervolume curve against it, by ``(arm, seed)``."""
    reference = pareto.default_reference(np.array([p for r in runs for p in r.points if p]))
    return reference, {(arm(r), r.seed): hv_curve(r, reference) for r in runs}


def reference_line(reference: np.ndarray, budget: float) -> str:
    shown = ", ".join(f"{v:.4g}" for v in reference)
    return (f"Reference point (fid, latency_ms, peak_mem_mb): ({shown}); budget {budget:g} "
            "device-s per study.")


def budget_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """The options every budgeted benchmark takes."""
    p.add_argument("--budget", type=float, default=150.0, help="device-seconds per study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(work))
    p.add_argument("--out", type=Path, help="write the markdown report here, and the "
                   "numbers and runs next to it as .json")


def write_report(out: Path | None, text: str, doc: dict[str, Any],
                 runs: Sequence[BudgetRun]) -> None:
    """The markdown report to ``out``, the numbers and runs to ``out`` with ``.json``."""
    if out is None:
        return
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {**doc, "runs": [r.__dict__ for r in runs]}, indent=1))


def hv_curve(run: Any, reference: np.ndarray) -> np.ndarray:
    """Hypervolume after each finished trial of ``run`` (``run.points``: None if not feasible)."""
    out, seen = [], []
    for p in run.points:
        if p is not None:
            seen.append(p)
        out.append(pareto.hypervolume(np.array(seen), reference.tolist()) if seen else 0.0)
    return np.array(out)


def hv_at(run: Any, curve: np.ndarray, spent: float) -> float:
    """The hypervolume once ``spent`` device-seconds were used (the last trial within it)."""
    inside = np.flatnonzero(np.array(run.spent) <= spent + 1e-9)
    return float(curve[inside[-1]]) if len(inside) else 0.0


def mean_spread(values: list[float]) -> str:
    """``mean ± std`` of ``values`` (just the mean for one value)."""
    v = np.array(values, float)
    return f"{v.mean():.4g} ± {v.std():.2g}" if len(v) > 1 else f"{v.mean():.4g}"
