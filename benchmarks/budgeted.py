"""What the pruning and evolution benchmarks share: studies on a budget of device-seconds,
and the hypervolume followed against the device-seconds spent.

A trial's device-seconds are its recorded ``timings.cpu_s`` (CPU time of its child
process, which a busy shared machine inflates far less than wall time).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial

from search import pareto, runner
from search import study as st
from search.coordinator import Coordinator


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
    return float(t.user_attrs.get(st.TIMINGS, {}).get("cpu_s", 0.0))


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
