"""MO-ASHA: rung-based multi-objective asynchronous successive halving.

Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving": training runs in
rungs at ``b * eta**k`` steps. When a trial reaches a rung, its vector ``(proxy, latency,
memory)`` is ranked among every trial that reached the same rung -- by non-dominated
front (Deb et al. 2002), then within a front by crowding distance or hypervolume
contribution -- and the top ``ceil(n / eta)`` continue. The decision is made at once
with whatever the rung holds (asynchronous: nobody waits), and a trial that is
non-dominated at its rung always continues.

The ranking functions are pure numpy on minimised ``(n, m)`` points; the pruner converts
its objectives to "lower is better" once, with its direction vector.

The proxy is the worker's validation loss, which compares trials only when they share the
prediction target and the noise schedule (an x0 loss is not an eps loss): in a space that
searches ``schedule.prediction`` or ``schedule.beta_schedule``, the rungs rank losses of
different scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial

from search import pareto
from search import study as st
from search.pruning import ConstraintPruner, Cost, stage1_values
from search.space import SearchSpace
from workers.records import Decision, Measurement, RungReport

TIEBREAKS = ("crowding", "hypervolume")
OBJECTIVES = ("proxy", "latency_ms", "memory_mb")
"""The rung vector: the quality proxy (validation loss) and the two measured costs."""


# -- ranking (pure) ----------------------------------------------------------------------


def _spread(front: np.ndarray, tiebreak: str, reference: np.ndarray) -> np.ndarray:
    """Larger is better within one front: crowding distance or exclusive HV contribution."""
    if tiebreak == "crowding":
        return pareto.crowding_distance(front)
    return pareto.hypervolume_contributions(front, reference.tolist())


def rank_order(points: np.ndarray, tiebreak: str = "crowding") -> np.ndarray:
    """Indices of minimised ``points`` ``(n, m)``, best first.

    Sorted by non-dominated front, then within a front by ``tiebreak`` (crowding distance,
    or hypervolume contribution w.r.t. 10% past the worst point), larger first; remaining
    ties by index, earlier first.
    """
    pts = np.asarray(points, float)
    if len(pts) == 0:
        return np.zeros(0, int)
    fronts = pareto.non_dominated_sort(pts)
    reference = pareto.default_reference(pts)
    spread = np.zeros(len(pts))
    for f in np.unique(fronts):
        members = np.flatnonzero(fronts == f)
        spread[members] = _spread(pts[members], tiebreak, reference)
    return np.lexsort((np.arange(len(pts)), -spread, fronts))


def keep_count(n: int, eta: int) -> int:
    """How many of ``n`` trials at a rung are in its top ``1/eta`` (at least one)."""
    return max(1, math.ceil(n / eta))


@dataclass(frozen=True)
class Verdict:
    """Where one point stands at its rung; ``proceed`` is the MO-ASHA rule."""

    position: int  # 0 = best of the rung
    front: int  # 0 = non-dominated
    n: int  # points at the rung, this one included
    keep: int  # ceil(n / eta)
    dominated_by: tuple[int, ...]  # indices of the points that dominate this one

    @property
    def proceed(self) -> bool:
        return self.front == 0 or self.position < self.keep


def judge(points: np.ndarray, index: int, eta: int, tiebreak: str = "crowding") -> Verdict:
    """The verdict for ``points[index]`` among all minimised ``points`` at one rung."""
    pts = np.asarray(points, float)
    order = rank_order(pts, tiebreak)
    fronts = pareto.non_dominated_sort(pts)
    dominators = tuple(int(i) for i in range(len(pts)) if pareto.dominates(pts[i], pts[index]))
    return Verdict(int(np.flatnonzero(order == index)[0]), int(fronts[index]), len(pts),
                   keep_count(len(pts), eta), dominators)


def survivors(points: np.ndarray, eta: int, tiebreak: str = "crowding") -> np.ndarray:
    """``(n,)`` bool: who continues if all of ``points`` are judged at once (a synchronous
    rung): the non-dominated, and the top ``ceil(n / eta)``."""
    pts = np.asarray(points, float)
    position = np.empty(len(pts), int)
    position[rank_order(pts, tiebreak)] = np.arange(len(pts))
    fronts = pareto.non_dominated_sort(pts)
    return np.asarray((fronts == 0) | (position < keep_count(len(pts), eta)), bool)


# -- the pruner --------------------------------------------------------------------------


def _memory_of(doc: dict[str, Any], which: str) -> float:
    sample, train = float(doc["sample_mb"]), float(doc["train_mb"])
    return {"sample": sample, "train": train, "max": max(sample, train)}[which]


def _names(numbers: Sequence[int], most: int = 5) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


class MoAshaPruner:
    """Constraint stages 0 and 1, optional stage-1 dominance, then MO-ASHA at each rung.

    History: ``proxies[step][number]`` is the proxy a trial reported at a rung (its latest
    attempt's), and ``costs[number]`` its latest measured ``(latency, memory)``; a rung's
    vectors are built from both when it is ranked, so a restored pruner (from the trials'
    ``rungs`` and ``measurement`` attributes) ranks exactly as the live one did.

    Args:
        space: its ``[rungs]`` give ``min_steps`` (b) and ``eta``; its ``[constraints]``
            the hard limits; ``[study] prune_dominated`` turns on stage-1 dominance.
        directions: ``minimize``/``maximize`` per entry of :data:`OBJECTIVES`.
        tiebreak: within a front, ``crowding`` distance or ``hypervolume`` contribution.

    Raises:
        ValueError: ``min_steps`` is 0 (no rungs), or a bad direction or tiebreak.
    """

    name = "mo-asha"

    def __init__(self, space: SearchSpace, directions: Sequence[str] = ("minimize",) * 3,
                 tiebreak: str = "crowding", prune_dominated: bool | None = None) -> None:
        if space.rungs.min_steps <= 0:
            raise ValueError("pruner mo-asha needs rungs: set [rungs] min_steps > 0")
        if len(directions) != len(OBJECTIVES) or set(directions) - {"minimize", "maximize"}:
            raise ValueError(f"directions: need minimize|maximize for each of {OBJECTIVES}")
        if tiebreak not in TIEBREAKS:
            raise ValueError(f"tiebreak: must be one of {', '.join(TIEBREAKS)}")
        self.constraints = ConstraintPruner(space)
        self.min_steps, self.eta = space.rungs.min_steps, space.rungs.eta
        self.memory = space.evaluate.memory
        self.maximize = tuple(d == "maximize" for d in directions)
        self.tiebreak = tiebreak
        self.prune_dominated = (space.study.prune_dominated if prune_dominated is None
                                else prune_dominated)
        self.proxies: dict[int, dict[int, float]] = {}
        self.costs: dict[int, tuple[float, float]] = {}
        self.totals: dict[int, int] = {}

    # -- history ---------------------------------------------------------------------

    def restore(self, trials: Sequence[FrozenTrial]) -> None:
        """Rebuild the rung history from every stored trial that reported to it."""
        self.proxies, self.costs = {}, {}
        for t in trials:
            doc = t.user_attrs.get(st.MEASUREMENT)
            if doc:
                self.costs[t.number] = (float(doc["latency_ms"]), _memory_of(doc, self.memory))
            for entry in t.user_attrs.get(st.RUNGS, []):
                self._record(t.number, int(entry["step"]), float(entry["val_loss"]))

    def _record(self, number: int, step: int, proxy: float) -> None:
        if math.isfinite(proxy):
            self.proxies.setdefault(step, {})[number] = proxy

    def table(self, step: int) -> tuple[list[int], np.ndarray]:
        """Trial numbers at rung ``step`` and their minimised vectors ``(n, 3)``."""
        numbers = sorted(n for n in self.proxies.get(step, {}) if n in self.costs)
        rows = [(self.proxies[step][n], *self.costs[n]) for n in numbers]
        values = np.array(rows, float).reshape(-1, len(OBJECTIVES))
        return numbers, pareto.to_minimize(values, self.maximize)

    # -- stages ----------------------------------------------------------------------

    def prescreen(self, number: int, cost: Cost) -> Decision:
        self.totals[number] = cost.train_steps
        return self.constraints.prescreen(number, cost)

    def on_measured(self, number: int, measurement: Measurement) -> Decision:
        values = stage1_values(measurement, self.memory)
        self.costs[number] = (values["latency_ms"], values["memory_mb"])
        decision = self.constraints.on_measured(number, measurement)
        if decision.proceed and self.prune_dominated:
            return self._best_case(number)
        return decision

    def on_rung(self, number: int, rung: RungReport, measurement: Measurement | None
                ) -> Decision:
        if measurement is not None:
            values = stage1_values(measurement, self.memory)
            self.costs[number] = (values["latency_ms"], values["memory_mb"])
        if not math.isfinite(rung.val_loss):
            return Decision(False, f"mo-asha step {rung.step}: non-finite proxy {rung.val_loss}")
        self._record(number, rung.step, rung.val_loss)
        numbers, points = self.table(rung.step)
        verdict = judge(points, numbers.index(number), self.eta, self.tiebreak)
        if self._last(number, rung.step):
            return Decision(True, f"mo-asha step {rung.step}: last rung, evaluation follows "
                                  f"({verdict.position + 1} of {verdict.n} here)")
        return Decision(verdict.proceed, self._explain(rung.step, verdict, numbers))

    def _last(self, number: int, step: int) -> bool:
        """The end of training: the full budget is spent, only evaluation remains."""
        total = self.totals.get(number, 0)
        if total:
            return step >= total
        ladder = self.min_steps  # unknown total: only steps off the b*eta^k ladder are last
        while ladder < step:
            ladder *= self.eta
        return ladder != step

    def _explain(self, step: int, v: Verdict, numbers: Sequence[int]) -> str:
        head = f"mo-asha step {step}: {v.position + 1} of {v.n}"
        rule = f"top {v.keep} = ceil({v.n}/{self.eta})"
        if v.front == 0:
            return f"{head}, non-dominated at this rung"
        if v.proceed:
            return f"{head} (front {v.front}), within the {rule}"
        by = _names([numbers[i] for i in v.dominated_by])
        return (f"{head} (front {v.front}, dominated by trial {by}); only the non-dominated "
                f"and the {rule} continue")

    def _best_case(self, number: int) -> Decision:
        """Stage-1 dominance: the measured costs with the best proxy of the highest rung."""
        steps = [s for s in self.proxies if self.table(s)[0]]
        if not steps:
            return Decision()
        step = max(steps)
        numbers, points = self.table(step)
        lat, mem = self.costs[number]
        best = pareto.to_minimize(np.array([0.0, lat, mem]), self.maximize)
        best[0] = points[:, 0].min()
        by = [n for n, p in zip(numbers, points) if n != number and pareto.dominates(p, best)]
        if not by:
            return Decision()
        return Decision(False, f"mo-asha stage 1: even with the best proxy at step {step}, "
                               f"latency {lat:.4g} ms and memory {mem:.4g} MB are dominated "
                               f"by trial {_names(by)}")
