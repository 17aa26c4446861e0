"""MO-ASHA: rung-based multi-objective asynchronous successive halving.

Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving": training runs in
rungs at ``b * eta**k`` steps. When a trial reaches a rung, its vector ``(proxy, latency,
memory)`` is ranked among every trial that reached the same rung -- by non-dominated
front (Deb et al. 2002), then within a front by crowding distance or hypervolume
contribution -- and the top ``ceil(n / eta)`` continue. The decision is made at once
with whatever the rung holds (asynchronous: nobody waits), and a trial that is
non-dominated at its rung always continues.

One rung ahead: a trial outside the top ``ceil(n / eta)`` is pruned only if it would still
be dominated with its proxy advanced by one rung of training -- multiplied by the rung
gain, the median ratio ``proxy(next rung) / proxy(this rung)`` of the trials that
reported both (about 0.7 for the validation loss between rungs at ``eta = 3``). A
validation-loss lead smaller than what one more rung of training buys says little about
the final quality: the loss is blind to the sampler and its step count (which cost
latency and buy quality), and a high learning rate lowers it early without lowering the
final FID. Until some trial has reported the next rung the gain is unknown and plain
dominance decides. The rule prunes a subset of what plain MO-ASHA prunes.

The ranking functions are pure numpy on minimised ``(n, m)`` points; the pruner converts
its objectives to "lower is better" once, with its direction vector.

Proxy groups: the proxy is the worker's validation loss, which compares trials only when
they share the prediction target and the noise schedule (a v loss is not an eps loss), and
which cannot see the sampler that decides much of the FID. A rung therefore ranks a trial
only among the trials of its proxy group (:func:`search.pruning.base.proxy_group`: same
prediction, beta schedule and sampler). On the recorded search benchmark the validation
loss ranks the final FID backwards across groups (v trials have the higher loss and the
lower FID) and forwards within many of them.

Sampler: on that benchmark MO-ASHA goes with NSGA-II (``[study] sampler = "nsga2"``); see
``benchmarks/searchbench/replay.md`` for how it compares with TPE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial

from search import pareto
from search.pruning.base import ConstraintPruner, Cost, proxy_group, stage1_values
from search.space import SearchSpace
from search.storage import record as rec
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


def ahead(point: np.ndarray, gain: float) -> np.ndarray:
    """A minimised point with its proxy (column 0) advanced by one rung: ``proxy * gain``,
    where that is no worse than ``proxy`` (else the point itself)."""
    out = np.array(point, float)
    if out[0] * gain <= out[0]:
        out[0] *= gain
    return out


def rung_gain(current: dict[int, float], following: dict[int, float]) -> float:
    """The median ratio ``following[n] / current[n]`` over the trials in both (proxy
    values of two consecutive rungs), or 1.0 where it means nothing: no trial in both,
    or values that are zero or of mixed sign (a ratio needs one sign throughout)."""
    both = [n for n in following if n in current]
    values = np.array([[current[n], following[n]] for n in both], float).reshape(-1, 2)
    if not len(values) or not (np.all(values > 0) or np.all(values < 0)):
        return 1.0
    return float(np.median(values[:, 1] / values[:, 0]))


@dataclass(frozen=True)
class Verdict:
    """Where one point stands at its rung; ``proceed`` is the MO-ASHA rule."""

    position: int  # 0 = best of the rung
    front: int  # 0 = non-dominated
    n: int  # points at the rung, this one included
    keep: int  # ceil(n / eta)
    dominated_by: tuple[int, ...]  # indices of the points that dominate this one
    ahead_by: tuple[int, ...] = ()  # ... and of those that dominate it one rung ahead
    gain: float = 1.0  # the rung gain that advanced its proxy

    @property
    def proceed(self) -> bool:
        return not self.ahead_by or self.position < self.keep


def judge(points: np.ndarray, index: int, eta: int, tiebreak: str = "crowding",
          gain: float = 1.0) -> Verdict:
    """The verdict for ``points[index]`` among all minimised ``points`` at one rung.

    It continues if it is in the top ``ceil(n / eta)``, or if no other point dominates it
    with its proxy advanced by ``gain`` (:func:`ahead`); ``gain = 1`` is plain MO-ASHA:
    the non-dominated continue.
    """
    pts = np.asarray(points, float)
    order = rank_order(pts, tiebreak)
    fronts = pareto.non_dominated_sort(pts)
    dominators = tuple(int(i) for i in range(len(pts)) if pareto.dominates(pts[i], pts[index]))
    advanced = ahead(pts[index], gain)
    still = tuple(i for i in dominators if pareto.dominates(pts[i], advanced))
    return Verdict(int(np.flatnonzero(order == index)[0]), int(fronts[index]), len(pts),
                   keep_count(len(pts), eta), dominators, still, gain)


def survivors(points: np.ndarray, eta: int, tiebreak: str = "crowding", gain: float = 1.0
              ) -> np.ndarray:
    """``(n,)`` bool: who continues if all of ``points`` are judged at once (a synchronous
    rung): the top ``ceil(n / eta)``, and those no other point dominates one rung ahead
    (with ``gain = 1``: the non-dominated)."""
    pts = np.asarray(points, float)
    position = np.empty(len(pts), int)
    position[rank_order(pts, tiebreak)] = np.arange(len(pts))
    free = np.array([not any(pareto.dominates(pts[j], ahead(pts[i], gain))
                             for j in range(len(pts)) if j != i) for i in range(len(pts))],
                    bool).reshape(-1)
    return np.asarray(free | (position < keep_count(len(pts), eta)), bool)


# -- the pruner --------------------------------------------------------------------------


def _names(numbers: Sequence[int], most: int = 5) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


class MoAshaPruner:
    """Constraint stages 0 and 1, optional stage-1 dominance, then MO-ASHA at each rung.

    History: ``proxies[step][number]`` is the proxy a trial reported at a rung (its latest
    attempt's), ``costs[number]`` its latest measured ``(latency, memory)`` and
    ``groups[number]`` its proxy group; a rung's vectors are built from these when it is
    ranked, so a restored pruner (from the trials' ``rungs``, ``measurement`` and config
    attributes) ranks exactly as the live one did.

    Args:
        space: its ``[rungs]`` give ``min_steps`` (b) and ``eta``; its ``[constraints]``
            the hard limits; ``[study] prune_dominated`` turns on stage-1 dominance.
        directions: ``minimize``/``maximize`` per entry of :data:`OBJECTIVES`.
        tiebreak: within a front, ``crowding`` distance or ``hypervolume`` contribution.
        one_rung_ahead: judge a dominated trial with its proxy one rung ahead (the default);
            ``False`` is plain MO-ASHA (every dominated trial outside the top 1/eta stops).
        by_group: rank a rung within the trial's proxy group (the default); ``False``
            ranks every trial at the rung together.

    Raises:
        ValueError: ``min_steps`` is 0 (no rungs), or a bad direction or tiebreak.
    """

    name = "mo-asha"

    def __init__(self, space: SearchSpace, directions: Sequence[str] = ("minimize",) * 3,
                 tiebreak: str = "crowding", prune_dominated: bool | None = None,
                 one_rung_ahead: bool = True, by_group: bool = True) -> None:
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
        self.one_rung_ahead = one_rung_ahead
        self.by_group = by_group
        self.prune_dominated = (space.study.prune_dominated if prune_dominated is None
                                else prune_dominated)
        self.proxies: dict[int, dict[int, float]] = {}
        self.costs: dict[int, tuple[float, float]] = {}
        self.totals: dict[int, int] = {}
        self.groups: dict[int, str] = {}

    # -- history ---------------------------------------------------------------------

    def restore(self, trials: Sequence[FrozenTrial]) -> None:
        """Rebuild the rung history from every stored trial that reported to it."""
        self.proxies, self.costs, self.groups = {}, {}, {}
        for t in map(rec.read, trials):
            if t.config is not None:
                self.groups[t.number] = proxy_group(t.config)
            if t.measured is not None:
                self.costs[t.number] = (t.measured.latency_ms, t.measured.memory_mb(self.memory))
            for rung in t.rungs:
                self._record(t.number, rung.step, rung.val_loss)

    def _record(self, number: int, step: int, proxy: float) -> None:
        if math.isfinite(proxy):
            self.proxies.setdefault(step, {})[number] = proxy

    def gain(self, step: int) -> float:
        """The rung gain from ``step`` to the next rung that any trial reported (1.0 until
        one has), on the minimised proxy; see :func:`rung_gain`."""
        later = sorted(s for s in self.proxies if s > step)
        if not later or not self.one_rung_ahead:
            return 1.0
        sign = -1.0 if self.maximize[0] else 1.0
        current = {n: sign * v for n, v in self.proxies.get(step, {}).items()}
        return rung_gain(current, {n: sign * v for n, v in self.proxies[later[0]].items()})

    def table(self, step: int, group: str | None = None) -> tuple[list[int], np.ndarray]:
        """Trial numbers at rung ``step`` (of proxy group ``group``, unless None) and their
        minimised vectors ``(n, 3)``."""
        numbers = sorted(n for n in self.proxies.get(step, {}) if n in self.costs
                         and (group is None or self.groups.get(n, "") == group))
        rows = [(self.proxies[step][n], *self.costs[n]) for n in numbers]
        values = np.array(rows, float).reshape(-1, len(OBJECTIVES))
        return numbers, pareto.to_minimize(values, self.maximize)

    # -- stages ----------------------------------------------------------------------

    def prescreen(self, number: int, cost: Cost) -> Decision:
        self.totals[number] = cost.train_steps
        self.groups[number] = cost.proxy_group
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
        numbers, points = self.table(rung.step, self._group(number))
        verdict = judge(points, numbers.index(number), self.eta, self.tiebreak,
                        self.gain(rung.step))
        if self._last(number, rung.step):
            return Decision(True, f"mo-asha step {rung.step}: last rung, evaluation follows "
                                  f"({verdict.position + 1} of {verdict.n} here)")
        return Decision(verdict.proceed, self._explain(rung.step, verdict, numbers))

    def _group(self, number: int) -> str | None:
        """Whom ``number`` is ranked against: its proxy group, or everyone (None)."""
        return self.groups.get(number, "") if self.by_group else None

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
        if v.position < v.keep:
            return f"{head} (front {v.front}), within the {rule}"
        if v.proceed:
            by = _names([numbers[i] for i in v.dominated_by])
            return (f"{head} (front {v.front}, dominated by trial {by}), but not with its proxy "
                    f"one rung ahead (x{v.gain:.3g}): continues")
        by = _names([numbers[i] for i in v.ahead_by])
        if v.gain == 1.0:
            return (f"{head} (front {v.front}, dominated by trial {by}); only the "
                    f"non-dominated and the {rule} continue")
        return (f"{head} (front {v.front}, dominated by trial {by}) even with its proxy one "
                f"rung ahead (x{v.gain:.3g}); only those not dominated one rung ahead and the "
                f"{rule} continue")

    def _best_case(self, number: int) -> Decision:
        """Stage-1 dominance: the measured costs with the best proxy of the highest rung."""
        group = self._group(number)
        steps = [s for s in self.proxies if self.table(s, group)[0]]
        if not steps:
            return Decision()
        step = max(steps)
        numbers, points = self.table(step, group)
        lat, mem = self.costs[number]
        best = pareto.to_minimize(np.array([0.0, lat, mem]), self.maximize)
        best[0] = points[:, 0].min()
        by = [n for n, p in zip(numbers, points) if n != number and pareto.dominates(p, best)]
        if not by:
            return Decision()
        return Decision(False, f"mo-asha stage 1: even with the best proxy at step {step}, "
                               f"latency {lat:.4g} ms and memory {mem:.4g} MB are dominated "
                               f"by trial {_names(by)}")
