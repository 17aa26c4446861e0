"""Architecture adaptation during training: grow a trial whose validation loss has
plateaued above the target, shrink one whose latency is over budget.

Both triggers are judged by the coordinator at a rung before the last (``[adapt]`` in the
space, :class:`search.space_settings.AdaptSettings`). When one fires, the running trial stops
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

from engine.config import Config, UNetConfig
from engine.model import morph
from engine.model.cost import flops, param_count
from search.hooks import evolution
from search.run.pipeline import Context, Flight, Hook
from search.space import SearchSpace
from search.space_settings import AdaptSettings
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage.artifacts import WEIGHTS
from workers.records import Decision, Outcome, RungReport, TrialOutcome

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


def peers(trials: Sequence[FrozenTrial], step: int, exclude: int) -> list[float]:
    """Validation losses that other trials, trained from scratch, reached at ``step``."""
    out = []
    for trial in map(rec.read, trials):
        if trial.number != exclude and trial.lineage.parent is None:
            out += [rung.val_loss for rung in trial.rungs if rung.step == step]
    return out


def enqueue(study: optuna.Study, parent: int, choice: Choice, fired: Trigger, at_step: int,
            steps_left: int, lineage_depth: int) -> int:
    """Enqueue the adapted trial (the next ask runs it); returns its number."""
    adaptation = lin.Adaptation(fired.kind, fired.reason, parent, at_step, steps_left,
                                lineage_depth + 1, choice.predicted_ms)
    study.enqueue_trial(choice.params, user_attrs=rec.attrs(lin.Lineage(
        parent, f"{fired.kind}: {choice.change}", adaptation)))
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max(t.number for t in waiting
               if lin.lineage_of(t).adaptation == adaptation)


@dataclass(frozen=True)
class Adapting:
    """A trial stopped at rung ``step`` to continue as ``choice``."""

    trigger: Trigger
    choice: Choice
    step: int


class AdaptHook(Hook):
    """Grow or shrink a running trial at a rung into a new trial that continues from its
    weights (``[adapt]``), when the space has such a neighbour.

    Args:
        predict: the target device's latency predictor (None: FLOPs stand in for it).
    """

    def __init__(self, space: SearchSpace,
                 predict: Callable[[Config], float | None] | None = None) -> None:
        self.space, self.predict = space, predict
        self.adapting: dict[int, Adapting] = {}

    def on_rung(self, ctx: Context, flight: Flight, rung: RungReport, decision: Decision
                ) -> Decision:
        settings = self.space.adapt
        if not settings.enabled or flight.measurement is None:
            return decision
        points = {r.step: r.val_loss for r in flight.rungs if r.attempt == flight.attempt}
        points.update(rung.val_history)  # every eval_every steps, and the rungs so far
        points[rung.step] = rung.val_loss

        def peer_losses() -> list[float]:
            return peers(ctx.study.get_trials(deepcopy=False), rung.step, flight.number)

        depth = lin.lineage_of(flight.trial).depth
        fired = trigger(settings, sorted(points.items()), flight.measurement.latency_ms,
                        peer_losses, depth)
        if fired is None:
            return decision
        choice = choose(fired.kind, self.space, dict(flight.trial.params), ctx.channels,
                        flight.measurement.latency_ms, self.predict, settings.shrink_above_ms)
        if choice is None:
            ctx.say(f"trial {flight.number}: {fired.reason}, but the space has no neighbour "
                    f"to {fired.kind} into")
            return decision
        self.adapting[flight.number] = Adapting(fired, choice, rung.step)
        return Decision(False, f"{fired.kind}: {fired.reason}; continues as {choice.change}",
                        keep_weights=True)

    def on_stopped(self, ctx: Context, flight: Flight, outcome: TrialOutcome) -> str:
        """Enqueue the trial the stopped one continues as (the next ask runs it)."""
        adapting = self.adapting.pop(flight.number, None)
        if (adapting is None or outcome.status is not Outcome.PRUNED
                or WEIGHTS not in outcome.artifacts):
            return ""
        left = max(1, flight.cost.train_steps - adapting.step)
        depth = lin.lineage_of(flight.trial).depth
        child = enqueue(ctx.study, flight.number, adapting.choice, adapting.trigger,
                        adapting.step, left, depth)
        rec.write(flight.trial, lin.AdaptedInto(child, adapting.trigger.kind,
                                                **describe(adapting.choice)))
        return f" (trial {child})"

    def on_retry(self, ctx: Context, flight: Flight) -> None:
        self.adapting.pop(flight.number, None)  # the next attempt is judged afresh


def describe(choice: Choice) -> dict[str, Any]:
    """A choice as a plain record (for the parent's user attrs)."""
    return {"change": choice.change, "predicted_latency_ms": choice.predicted_ms,
            "unet": asdict(choice.config.unet)}
