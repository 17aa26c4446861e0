"""Evolution: mutate a Pareto-front trial into a neighbouring candidate whose training
starts from its parent's weights.

With probability ``[study] mutation_rate`` the coordinator, instead of asking the sampler,
picks a trial of the current front (feasible, complete, with a checkpoint), mutates its
parameters and enqueues them (``study.enqueue_trial``) with the user attrs ``parent`` and
``mutation``. An architecture mutation is a morphism (:func:`engine.model.morph.neighbours`,
what :func:`engine.model.morph.mutate` draws from) that maps onto the space -- every changed
field is searched and takes a value the space allows; a schedule or training mutation
moves one parameter to a neighbouring value. Either way the child decodes to a valid
config of the space.

The child then starts from the parent's EMA weights, morphed to its architecture by
:func:`engine.model.morph.inherit` on the worker, and trains for ``[study] inherit_budget`` of
the training steps; an architecture the morphisms cannot reach starts fresh with the
full budget. The trial's ``inheritance`` user attr says which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from engine.config import Config, UNetConfig
from engine.model import morph
from search import pareto
from search.pruning.base import Cost
from search.run.pipeline import Context, Flight, Hook
from search.run.pool import Worker
from search.space import SearchSpace
from search.space_params import Param
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage import study as st
from search.storage.artifacts import WEIGHTS
from workers.records import Measurement, Parent, TrialRequest

ATTEMPTS = 50


def front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Feasible COMPLETE trials on the Pareto front that kept their weights."""
    done = [t for t in trials if _kept_weights(r := rec.read(t)) and r.complete and r.feasible]
    if not done:
        return []
    mask = pareto.pareto_mask(st.objective_values(done))
    return [t for t, keep in zip(done, mask) if keep]


def propose(space: SearchSpace, params: dict[str, Any], rng: np.random.Generator,
            channels: int = 1) -> tuple[dict[str, Any], str] | None:
    """A neighbour of ``params`` in the space, and what changed (None: there is none).

    The architecture changes in the share of draws that its searched parameters hold among
    all searched ones, by a morphism that maps onto the space (or, when none does, by one
    of its parameters stepped); otherwise a schedule or training parameter is stepped.
    """
    searched = [p for p in space.params if p.searched]
    unet = [p for p in searched if p.name.startswith("unet.")]
    others = [p for p in searched if p not in unet]
    if unet and (not others or rng.random() < len(unet) / len(searched)):
        parent = space.decode(params, channels)
        options = [m for m in (onto_space(space, params, parent.unet, child, channels)
                               for child in morph.neighbours(parent.unet, quantum=1,
                                                             max_width=10**6))
                   if m is not None]
        if options:
            return options[int(rng.integers(len(options)))]
        return _step_one(space, params, rng, channels, unet)
    return _step_one(space, params, rng, channels, others)


def onto_space(space: SearchSpace, params: dict[str, Any], parent: UNetConfig,
                child: UNetConfig, channels: int) -> tuple[dict[str, Any], str] | None:
    """The parameters of ``child``, if every field it changes is searched and allowed."""
    searched = {p.name: p for p in space.params if p.searched}
    out, changes = dict(params), []
    for f in fields(UNetConfig):
        old, new = getattr(parent, f.name), getattr(child, f.name)
        if old == new:
            continue
        p = searched.get(f"unet.{f.name}")
        if p is None or not p.allows(new):
            return None
        out[p.name] = p.encode(list(new) if isinstance(new, tuple) else new)
        changes.append(f"{p.name} {_show(old)} -> {_show(new)}")
    return (out, ", ".join(changes)) if _valid(space, out, channels) else None


def _step_one(space: SearchSpace, params: dict[str, Any], rng: np.random.Generator,
              channels: int, searched: list[Param]) -> tuple[dict[str, Any], str] | None:
    """One of the ``searched`` parameters moved to a neighbouring value (a valid config)."""
    for _ in range(ATTEMPTS):
        p = searched[int(rng.integers(len(searched)))]
        old = p.decode(params[p.name])
        new = _neighbour(p, old, rng)
        if new is None:
            continue
        out = {**params, p.name: p.encode(new)}
        if _valid(space, out, channels):
            return out, f"{p.name} {_show(old)} -> {_show(new)}"
    return None


def _neighbour(p: Param, value: Any, rng: np.random.Generator) -> Any:
    """Another choice, the next integer step up or down, or a float an eighth of the range
    (in log space where the range is log) away, kept inside the range."""
    if p.kind == "choice":
        others = [c for c in p.choices if c != value]
        return others[int(rng.integers(len(others)))] if others else None
    signs = (1, -1) if rng.random() < 0.5 else (-1, 1)
    for sign in signs:  # the other way at an end of the range
        if p.kind == "int":
            new = value + sign * int(p.step or 1)
        elif p.log:
            new = float(min(max(value * math.exp(sign * math.log(p.high / p.low) / 8), p.low),
                            p.high))
        else:
            new = float(min(max(value + sign * (p.high - p.low) / 8, p.low), p.high))
        if new != value and p.allows(new):
            return new
    return None


def _valid(space: SearchSpace, params: dict[str, Any], channels: int) -> bool:
    try:
        space.decode(params, channels)
    except ValueError:
        return False
    return True


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def enqueue_mutation(study: optuna.Study, space: SearchSpace, channels: int,
                     rng: np.random.Generator) -> int | None:
    """Mutate a random front trial and enqueue the child; returns the parent's number
    (None: no front yet, or no neighbour)."""
    parents = front(study.get_trials(deepcopy=False))
    if not parents:
        return None
    parent = parents[int(rng.integers(len(parents)))]
    proposal = propose(space, dict(parent.params), rng, channels)
    if proposal is None:
        return None
    params, change = proposal
    study.enqueue_trial(params, user_attrs=rec.attrs(lin.Lineage(parent.number, change)))
    return parent.number


def inherit_steps(steps: int, budget: float) -> int:
    """The shorter training budget of a child that starts from its parent's weights."""
    return max(1, round(steps * budget))


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    trial = study.get_trials(deepcopy=False)[number]
    assert trial.number == number, (trial.number, number)
    return trial


def reachable(study: optuna.Study, parent: int, child: Config) -> str:
    """Why the child cannot inherit from trial ``parent`` ("" when it can)."""
    trial = rec.read(_trial(study, parent))
    if not _kept_weights(trial) or trial.config is None:
        return f"trial {parent} kept no weights"
    if not morph.reachable(trial.config.unet, child.unet):
        return "not reachable from the parent's architecture by engine.model.morph"
    return ""


def load_parent(study: optuna.Study, parent: int, rungs: tuple[int, ...]) -> Parent | None:
    """The parent's config and EMA weights, read from its artifacts (None: they are gone)."""
    trial = rec.read(_trial(study, parent))
    path = Path((trial.finished.artifacts or {}).get(WEIGHTS, ""))
    if not path.is_file() or trial.config is None:
        return None
    return Parent(parent, trial.config.to_dict(), path.read_bytes(), rungs)


def _kept_weights(trial: rec.TrialRecord) -> bool:
    return WEIGHTS in (trial.finished.artifacts or {})


class EvolutionHook(Hook):
    """Mutation proposals of front trials, and children that start from their parent's
    weights (mutations, and the trials :mod:`search.hooks.adapt` grows or shrinks)."""

    def __init__(self, space: SearchSpace, study: optuna.Study) -> None:
        self.space = space
        self.seed = int(study.user_attrs.get("seed", space.study.seed))
        self.parents: dict[int, int] = {}  # trial -> the parent whose weights it starts from

    def before_ask(self, ctx: Context) -> None:
        """With probability ``mutation_rate``, enqueue a mutation of a front trial for the
        next ask; the draw depends on the seed and the trial count, so a resumed study draws
        as the uninterrupted one would."""
        rate = self.space.study.mutation_rate
        if rate <= 0:
            return
        rng = np.random.default_rng([self.seed, len(ctx.study.get_trials(deepcopy=False))])
        if rng.random() < rate:
            enqueue_mutation(ctx.study, self.space, ctx.channels, rng)

    def on_asked(self, ctx: Context, trial: optuna.Trial, config: Config, cost: Cost) -> Cost:
        """A child that can inherit trains the shorter budget; one that cannot starts fresh,
        with the reason recorded."""
        lineage = lin.lineage_of(trial)
        if lineage.parent is None:
            return cost
        why = reachable(ctx.study, lineage.parent, config)
        if why:
            rec.write(trial, rec.Inheritance({"status": "fresh", "parent": lineage.parent,
                                              "reason": why}))
            return cost
        self.parents[trial.number] = int(lineage.parent)
        steps = (lineage.adaptation.steps if lineage.adaptation else
                 inherit_steps(config.train.steps, self.space.study.inherit_budget))
        return replace(cost, train_steps=steps)

    def on_dispatch(self, ctx: Context, flight: Flight, worker: Worker,
                    request: TrialRequest) -> TrialRequest:
        """The parent's config and weights go with the request (read from its artifacts)."""
        parent = self.parents.get(flight.number)
        if parent is None:
            return request
        loaded = load_parent(ctx.study, parent, ctx.space.rungs.steps(flight.cost.train_steps))
        if loaded is None:
            rec.write(flight.trial, rec.Inheritance({
                "status": "fresh", "parent": parent,
                "reason": f"trial {parent}'s weights are gone from its artifacts"}))
        return replace(request, parent=loaded)

    def on_measured(self, ctx: Context, flight: Flight, worker: Worker, m: Measurement
                    ) -> Measurement:
        if m.start.get("parent") is not None:
            rec.write(flight.trial, rec.Inheritance(m.start))
        return m
