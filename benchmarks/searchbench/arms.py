"""The arms of the replay: who proposes the next config, and who stops a trial where.

Every arm asks in the frozen space, maps a proposal to the nearest recorded config
(:meth:`recorded.Table.nearest`) and plays that row stage by stage (:func:`play`) until its
budget of device-seconds is spent, one trial at a time (a single worker). A trial costs
the CPU-seconds its process had used where it stopped: nothing at stage 0, the
measurement at stage 1, the rung's seconds at a rung, everything when it completed.

- ``tpe``, ``nsga2``: Optuna alone (the coordinator's own samplers,
  ``search.storage.study.make_sampler``), driven through the real ``NoPruner``;
- ``random``: Optuna's RandomSampler, no pruning;
- ``mmp-sh``, ``mmp-median``: TPE with OptunaHub's ``pruners/multi_metric_pruner``
  (``joint=True``: Pareto rank of (val loss, latency, memory) at each rung, fed to
  successive halving (b = min_steps, eta) or the median rule), loaded from a local copy of
  the registry;
- ``syne-moasha``: Syne Tune's MOASHA scheduler (its own random proposals, its
  continue/stop answers at each rung on the same three metrics);
- ``constraints``, ``mo-asha``: TPE with diffnas's ``search.pruning`` classes, consulted at
  stage 0, stage 1 and every rung exactly as ``search.run.stages`` consults them.

Every Optuna arm records the constraint values known where its trial stopped
(``trial.set_constraint``, as the coordinator does), so its sampler learns the
infeasible region alike. The peer libraries are imported only by their arms.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.trial import TrialState
from recorded import Row, Table

from search.pruning.base import ConstraintPruner, NoPruner, Pruner
from search.pruning.mo_asha import MoAshaPruner
from search.storage.study import make_sampler

PEERS = ("tpe", "nsga2", "random", "mmp-sh", "mmp-median", "syne-moasha")
DIFFNAS = ("constraints", "mo-asha")
ARMS = (*PEERS, *DIFFNAS)
NEEDS_PEER_LIBRARY = ("mmp-sh", "mmp-median", "syne-moasha")
METRICS = ("val_loss", "latency_ms", "memory_mb")
"""What a peer pruner sees at each rung: the vector MO-ASHA ranks."""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Played:
    """One replayed trial: its row, where it stopped, what it cost, the distance from
    the proposal to the row, and its objective point if it counts for the hypervolume."""

    row: int
    stop: str  # stage0 | stage1 | rung <step> | complete | failed
    cost: float
    distance: float
    point: tuple[float, ...] | None


class Stopper(Protocol):
    """Answers continue (True) or stop at each stage of one trial."""

    def stage0(self, number: int, row: Row) -> bool: ...

    def stage1(self, number: int, row: Row) -> bool: ...

    def rung(self, number: int, row: Row, index: int, last: bool) -> bool: ...


def play(row: Row, number: int, stopper: Stopper) -> tuple[str, float]:
    """Where ``row`` stops under ``stopper``, and the device-seconds that cost."""
    if not stopper.stage0(number, row):
        return "stage0", 0.0
    if row.measurement is None:
        return "failed", row.cpu_end
    if not stopper.stage1(number, row):
        return "stage1", row.cpu_measured
    for index, rung in enumerate(row.rungs):
        last = index == len(row.rungs) - 1 and row.status == "completed"
        if not stopper.rung(number, row, index, last):
            return f"rung {rung.step}", row.rung_cpu[index]
    return ("complete" if row.status == "completed" else "failed"), row.cpu_end


class PrunerStopper:
    """A diffnas pruner, asked as ``search.run.stages`` asks it."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner

    def stage0(self, number: int, row: Row) -> bool:
        return self.pruner.prescreen(number, row.cost).proceed

    def stage1(self, number: int, row: Row) -> bool:
        assert row.measurement is not None
        return self.pruner.on_measured(number, row.measurement).proceed

    def rung(self, number: int, row: Row, index: int, last: bool) -> bool:
        return self.pruner.on_rung(number, row.rungs[index], row.measurement).proceed


def _rung_metrics(table: Table, row: Row, index: int) -> dict[str, float]:
    assert row.measurement is not None
    return {"val_loss": row.rungs[index].val_loss, "latency_ms": row.measurement.latency_ms,
            "memory_mb": row.measurement.memory_mb(table.space.evaluate.memory)}


class MultiMetricStopper:
    """OptunaHub's MultiMetricPruner: report the rung vector, then ``should_prune``."""

    def __init__(self, table: Table, module: Any, trial: optuna.Trial) -> None:
        self.table, self.trial = table, module.MultiMetricPrunerTrial(trial)

    def stage0(self, number: int, row: Row) -> bool:
        return True

    def stage1(self, number: int, row: Row) -> bool:
        return True

    def rung(self, number: int, row: Row, index: int, last: bool) -> bool:
        self.trial.report(_rung_metrics(self.table, row, index), row.rungs[index].step)
        return last or not self.trial.should_prune()


class SyneStopper:
    """Syne Tune's scheduler: report the rung vector, stop on its STOP (the last rung,
    ``max_t``, answers STOP too: that is the end of training, not a prune)."""

    def __init__(self, table: Table, scheduler: Any, trial: Any) -> None:
        self.table, self.scheduler, self.trial = table, scheduler, trial

    def stage0(self, number: int, row: Row) -> bool:
        return True

    def stage1(self, number: int, row: Row) -> bool:
        return True

    def rung(self, number: int, row: Row, index: int, last: bool) -> bool:
        from syne_tune.optimizer.scheduler import SchedulerDecision  # benchmark env only

        result = {"step": row.rungs[index].step, **_rung_metrics(self.table, row, index)}
        decision = self.scheduler.on_trial_result(self.trial, result)
        return last or decision != SchedulerDecision.STOP


def _tell(study: optuna.Study, trial: optuna.Trial, table: Table, row: Row, stop: str) -> None:
    """Record the constraint values known where the trial stopped, then tell its state."""
    for name, value in table.violations(row, measured=stop != "stage0").items():
        trial.set_constraint(name, value)
    if stop == "complete":
        assert row.values is not None
        study.tell(trial, values=list(row.values))
    else:
        study.tell(trial, state=TrialState.FAIL if stop == "failed" else TrialState.PRUNED)


def _point(table: Table, row: Row, stop: str) -> tuple[float, ...] | None:
    return row.values if stop == "complete" and table.feasible(row) else None


def _sampler(name: str, table: Table, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return make_sampler(table.space, name, seed, 0)


def load_multi_metric(registry: Path) -> Any:
    """The ``pruners/multi_metric_pruner`` module of a local copy of the registry."""
    import optunahub  # the benchmark's own environment only, never a package dependency

    return optunahub.load_local_module(package="pruners/multi_metric_pruner",
                                       registry_root=str(registry))


class StoredSuccessiveHalving(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's successive halving, given a trial that exists in the study it is asked about.

    With ``joint=True`` the registry's pruner (as copied) hands its base pruner a trial
    built by ``create_trial`` that is in no storage (id -1); successive halving writes its
    rung to that trial and raises ``KeyError: 'No trial with trial_id -1 exists.'``. This
    adds the trial to the pruner's throw-away study first; nothing else changes.
    """

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        storage = study._storage
        number = storage.create_new_trial(study._study_id, template_trial=trial)
        return super().prune(study, storage.get_trial(number))


def _multi_metric_pruner(arm: str, table: Table, registry: Path) -> optuna.pruners.BasePruner:
    module = load_multi_metric(registry)
    rungs = table.space.rungs
    base: optuna.pruners.BasePruner = (
        StoredSuccessiveHalving(min_resource=rungs.min_steps, reduction_factor=rungs.eta)
        if arm == "mmp-sh" else optuna.pruners.MedianPruner())
    pruner: optuna.pruners.BasePruner = module.MultiMetricPruner(
        base, metric_directions={m: "minimize" for m in METRICS}, joint=True)
    return pruner


def run_optuna(arm: str, table: Table, seed: int, budget: float, registry: Path | None
               ) -> list[Played]:
    """An Optuna arm: ask, play the nearest row, tell, until ``budget`` is spent."""
    sampler = _sampler("nsga2" if arm == "nsga2" else "random" if arm == "random" else "tpe",
                       table, seed)
    mmp = arm.startswith("mmp-")
    if mmp and registry is None:
        raise ValueError(f"arm {arm} needs --registry (a local copy of the registry)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = _multi_metric_pruner(arm, table, registry) if mmp else None  # type: ignore[arg-type]
        study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler,
                                    pruner=pruner)
        module = load_multi_metric(registry) if mmp else None  # type: ignore[arg-type]
        diffnas = _diffnas_pruner(arm, table)
        distributions = table.space.distributions()
        played: list[Played] = []
        spent = 0.0
        while spent < budget:
            trial = study.ask(fixed_distributions=distributions)
            index, distance = table.nearest(trial.params)
            row = table.rows[index]
            stopper: Stopper = (MultiMetricStopper(table, module, trial) if mmp
                                else PrunerStopper(diffnas))
            stop, cost = play(row, trial.number, stopper)
            _tell(study, trial, table, row, stop)
            played.append(Played(index, stop, cost, distance, _point(table, row, stop)))
            spent += cost
    return played


def _diffnas_pruner(arm: str, table: Table) -> Pruner:
    if arm == "constraints":
        return ConstraintPruner(table.space)
    if arm == "mo-asha":
        return MoAshaPruner(table.space)
    return NoPruner(table.space)


def _syne_space(table: Table) -> dict[str, Any]:
    """The frozen space in Syne Tune's terms (categorical values in their Optuna encoding)."""
    from syne_tune import config_space as cs  # the benchmark's own environment only

    out: dict[str, Any] = {}
    for p in table.space.params:
        if not p.searched:
            continue
        if p.kind == "choice":
            out[p.name] = cs.choice([p.encode(c) for c in p.choices])
        elif p.kind == "int":
            out[p.name] = (cs.lograndint if p.log else cs.randint)(int(p.low), int(p.high))
        else:
            out[p.name] = (cs.loguniform if p.log else cs.uniform)(p.low, p.high)
    return out


def run_syne_moasha(table: Table, seed: int, budget: float) -> list[Played]:
    """Syne Tune's MOASHA: its proposals, its stop decisions at every rung."""
    from syne_tune.backend.trial_status import Trial  # the benchmark's own environment only
    from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA

    np.random.seed(seed)  # MOASHA draws brackets and configs from numpy's global state
    rungs, total = table.space.rungs, table.rows[0].cost.train_steps
    scheduler = MOASHA(_syne_space(table), metrics=list(METRICS), time_attr="step",
                       max_t=total, grace_period=rungs.min_steps,
                       reduction_factor=rungs.eta, random_seed=seed)
    played: list[Played] = []
    spent, number = 0.0, 0
    now = datetime.datetime.now()
    while spent < budget:
        suggestion = scheduler.suggest()
        config = dict(suggestion.config)
        trial = Trial(trial_id=number, config=config, creation_time=now)
        scheduler.on_trial_add(trial)
        index, distance = table.nearest(config)
        row = table.rows[index]
        stop, cost = play(row, number, SyneStopper(table, scheduler, trial))
        played.append(Played(index, stop, cost, distance, _point(table, row, stop)))
        spent += cost
        number += 1
    return played


def run_arm(arm: str, table: Table, seed: int, budget: float, registry: Path | None = None
            ) -> list[Played]:
    """Replay ``arm`` with ``seed`` until ``budget`` device-seconds are spent.

    Raises:
        ValueError: an unknown arm, or an OptunaHub arm without ``registry``.
    """
    runners: dict[str, Callable[[], list[Played]]] = {
        "syne-moasha": lambda: run_syne_moasha(table, seed, budget)}
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (choose from {', '.join(ARMS)})")
    return runners.get(arm, lambda: run_optuna(arm, table, seed, budget, registry))()
