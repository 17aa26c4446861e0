"""Architecture adaptation during training: grow a trial whose validation loss has
plateaued above the target, shrink one whose latency is over budget.

Both triggers are judged by the coordinator at a rung before the last (``[adapt]`` in the
space, :class:`search.space.AdaptSettings`). When one fires, the running trial stops
(PRUNED, with its checkpoint kept) and a new trial is enqueued whose architecture is one
morphism away (:func:`engine.model.morph.neighbours`, mapped onto the space) and whose weights
are the stopped trial's, morphed on the worker by :func:`engine.model.morph.inherit`: widening
and deepening preserve the network's function, narrowing keeps the most important
channels and the rest of training is the recovery. The new trial trains for the steps its
parent had left.

Why a new trial rather than the same one with another architecture: the sampler learns
from every trial's parameters and values, so a trial's values must come from the
architecture its parameters describe. The child is an ordinary trial of the space, linked
to its parent by the user attrs ``parent``, ``mutation`` and ``adaptation``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.model import morph
from engine.config import Config, UNetConfig
from engine.model.cost import flops, param_count
from search import evolution
from search import study as st
from search.space import AdaptSettings, SearchSpace

ADAPTATION = st.ADAPTATION  # child trial user attr: the trigger, its parent's step, its budget
ADAPTED_INTO = "adapted_into"  # parent trial user attr: the number of the trial it became
MIN_PEERS = 3  # trials at a step before their median validation loss is the grow target

GROW, SHRINK = "grow", "shrink"


@dataclass(frozen=True)
class Trigger:
    """A trial should adapt: ``kind`` is ``grow`` or ``shrink``; ``reason`` says why."""

    kind: str
    reason: str


def plateau_gain(history: Sequence[tuple[int, float]], patience: int) -> float | None:
    """The relative drop of the validation loss over the last ``patience`` validation points
    (``(step, loss)`` pairs; None when there are not that many yet)."""
    if len(history) <= patience:
        return None
    before, now = history[-1 - patience][1], history[-1][1]
    return (before - now) / before if before > 0 else 0.0


def grow_target(settings: AdaptSettings, peers: Sequence[float]) -> float | None:
    """The loss a trial must be above to grow: the setting, else the median of the peers'
    validation losses at the same step (None until ``MIN_PEERS`` trials reported it)."""
    if settings.target_loss is not None:
        return settings.target_loss
    return statistics.median(peers) if len(peers) >= MIN_PEERS else None


def trigger(settings: AdaptSettings, history: Sequence[tuple[int, float]],
            latency_ms: float | None, peers: Callable[[], Sequence[float]], depth: int
            ) -> Trigger | None:
    """Whether a trial at a rung before its last should adapt (shrink is judged first).

    Args:
        history: the trial's validation points so far, ``(step, loss)``, the rung's last.
        latency_ms: its measured latency on the target device class (None: not measured).
        peers: the validation losses other trials reached at the rung's step; asked for
            only when the loss has plateaued and no ``target_loss`` is set (it reads the
            study).
        depth: how many adaptations its lineage has made already.
    """
    if depth >= settings.max_depth or not history:
        return None
    budget = settings.shrink_above_ms
    if budget is not None and latency_ms is not None and latency_ms > budget:
        return Trigger(SHRINK, f"latency {latency_ms:.4g} ms is over the {budget:g} ms budget")
    if not settings.grow:
        return None
    gain = plateau_gain(history, settings.patience)
    if gain is None or gain >= settings.plateau:
        return None
    target = grow_target(settings, peers())
    step, loss = history[-1]
    if target is None or loss <= target:
        return None
    source = "target_loss" if settings.target_loss is not None else "the median at this step"
    return Trigger(GROW, f"val loss {loss:.4g} plateaued (-{gain:.1%} over the last "
                         f"{settings.patience} points to step {step}) above {target:.4g} "
                         f"({source})")


@dataclass(frozen=True)
class Choice:
    """The architecture a trial adapts into: its params, what changed, predicted latency."""

    params: dict[str, Any]
    change: str
    config: Config
    predicted_ms: float


def choose(kind: str, space: SearchSpace, params: dict[str, Any], channels: int,
           latency_ms: float, cost: Callable[[Config], float | None] | None = None,
           budget_ms: float | None = None) -> Choice | None:
    """The neighbour of ``params`` to grow or shrink into (None: the space has none).

    Candidates are the morphisms of :func:`engine.model.morph.neighbours` that map onto the
    space, change the parameter count the right way and that :func:`engine.model.morph.inherit`
    can carry the weights across. Each one's latency is predicted as the trial's measured
    ``latency_ms`` times the ratio of ``cost`` (the target device's latency table; FLOPs
    when it gives none). Growth takes the cheapest; shrinking takes the largest that fits
    ``budget_ms``, else the smallest (which may shrink again at its own first rung).
    """
    parent = space.decode(params, channels)
    base = _cost(parent, cost)
    options: list[Choice] = []
    for unet in morph.neighbours(parent.unet, quantum=1, max_width=10**6):
        mapped = evolution.onto_space(space, params, parent.unet, unet, channels)
        if mapped is None or not _direction(kind, parent.unet, unet):
            continue
        child = space.decode(mapped[0], channels)
        if not morph.reachable(parent.unet, child.unet):
            continue
        ratio = _cost(child, cost) / base if base > 0 else 1.0
        options.append(Choice(mapped[0], mapped[1], child, latency_ms * ratio))
    if not options:
        return None
    by_latency = sorted(options, key=lambda c: c.predicted_ms)
    if kind == GROW:
        return by_latency[0]
    fits = [c for c in by_latency if budget_ms is None or c.predicted_ms <= budget_ms]
    return fits[-1] if fits else by_latency[0]


def _direction(kind: str, parent: UNetConfig, child: UNetConfig) -> bool:
    before, after = param_count(parent), param_count(child)
    return after > before if kind == GROW else after < before


def _cost(config: Config, cost: Callable[[Config], float | None] | None) -> float:
    value = cost(config) if cost is not None else None
    return float(value) if value is not None else float(flops(config.unet))


def depth(trial: FrozenTrial | optuna.Trial) -> int:
    """How many adaptations made this trial (0: sampled or mutated)."""
    return int(trial.user_attrs.get(ADAPTATION, {}).get("depth", 0))


def peers(trials: Sequence[FrozenTrial], step: int, exclude: int) -> list[float]:
    """Validation losses that other trials, trained from scratch, reached at ``step``."""
    out = []
    for t in trials:
        if t.number == exclude or evolution.PARENT in t.user_attrs:
            continue
        out += [float(r["val_loss"]) for r in t.user_attrs.get(st.RUNGS, [])
                if int(r["step"]) == step]
    return out


def enqueue(study: optuna.Study, parent: int, choice: Choice, fired: Trigger, at_step: int,
            steps_left: int, lineage_depth: int) -> int:
    """Enqueue the adapted trial (the next ask runs it); returns its number."""
    doc = {"trigger": fired.kind, "reason": fired.reason, "parent": parent,
           "at_step": at_step, "steps": steps_left, "depth": lineage_depth + 1,
           "predicted_latency_ms": choice.predicted_ms}
    study.enqueue_trial(choice.params, user_attrs={
        evolution.PARENT: parent, evolution.MUTATION: f"{fired.kind}: {choice.change}",
        ADAPTATION: doc})
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max(t.number for t in waiting if t.user_attrs.get(ADAPTATION) == doc)


def steps_of(trial: optuna.Trial) -> int | None:
    """The training steps of an adapted trial (its parent's remaining steps), else None."""
    doc = trial.user_attrs.get(ADAPTATION)
    return int(doc["steps"]) if doc else None


def describe(choice: Choice) -> dict[str, Any]:
    """A choice as a plain record (for the parent's user attrs)."""
    return {"change": choice.change, "predicted_latency_ms": choice.predicted_ms,
            "unet": asdict(choice.config.unet)}
