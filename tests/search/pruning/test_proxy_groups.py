"""MO-ASHA ranks a rung within the trial's proxy group (same prediction target, beta
schedule and sampler): a grouped pruner answers as one separate pruner per group would, and
it drives a real Optuna study with the NSGA-II sampler the benchmark pairs it with."""

import re

import numpy as np
import optuna
from optuna.trial import TrialState

from engine.model.cost import flops, param_count
from search.pruning.base import Cost, proxy_group
from search.pruning.mo_asha import MoAshaPruner
from search.space import load_space, parse_space
from search.storage.study import make_sampler
from workers.records import Measurement, RungReport

GROUPS = ("eps/cosine/ddim", "v/cosine/ddim")


def _space():
    return parse_space(load_space("smoke").source)


def _measurement(latency, memory):
    return Measurement(latency, 0.01, (latency,) * 5, train_mb=memory, sample_mb=memory,
                       seconds=0.1)


def _arrive(pruner, number, group, proxy, latency, memory):
    assert pruner.prescreen(number, Cost(1000, 10_000, 90, proxy_group=group)).proceed
    m = _measurement(latency, memory)
    pruner.on_measured(number, m)
    return pruner.on_rung(number, RungReport(10, proxy, proxy, 1.0), m)


def test_the_group_is_what_the_loss_cannot_compare():
    space = load_space("demo")
    base = space.decode({**{p.name: p.encode(p.choices[0]) if p.kind == "choice" else p.low
                            for p in space.params if p.searched}})
    s = base.schedule
    assert proxy_group(base) == f"{s.prediction}/{s.beta_schedule}/{s.sampler}"
    wider = base.__class__.from_dict({**base.to_dict(), "train": {
        **base.to_dict()["train"], "learning_rate": 0.5 * base.train.learning_rate}})
    assert proxy_group(wider) == proxy_group(base)  # the loss sees the learning rate
    other = "v" if s.prediction == "eps" else "eps"
    moved = base.__class__.from_dict({**base.to_dict(), "schedule": {
        **base.to_dict()["schedule"], "prediction": other}})
    assert proxy_group(moved) != proxy_group(base)


def test_a_grouped_rung_answers_as_one_pruner_per_group():
    rng = np.random.default_rng(5)
    grouped = MoAshaPruner(_space())
    alone = {g: MoAshaPruner(_space(), by_group=False) for g in GROUPS}
    for number in range(40):
        group = GROUPS[int(rng.integers(2))]
        scale = 2.0 if group.startswith("v") else 1.0  # a v loss is about twice an eps loss
        proxy, latency, memory = scale * rng.uniform(0.1, 0.3), *rng.uniform(1, 5, 2)
        mine = _arrive(grouped, number, group, proxy, latency, memory)
        oracle = _arrive(alone[group], number, "", proxy, latency, memory)
        assert mine == oracle, number


def test_an_ungrouped_rung_prunes_the_v_trial_a_grouped_one_keeps():
    kept, pruned = MoAshaPruner(_space()), MoAshaPruner(_space(), by_group=False)
    for p in (kept, pruned):
        _arrive(p, 0, GROUPS[0], 0.10, 2.0, 2.0)  # eps: the lower loss, cheaper
    assert _arrive(kept, 1, GROUPS[1], 0.20, 3.0, 3.0).proceed
    assert not _arrive(pruned, 1, GROUPS[1], 0.20, 3.0, 3.0).proceed


def test_nsga2_and_mo_asha_drive_a_real_study():
    # The demo space with its prediction target searched again (the preset fixes it to v).
    source = load_space("demo").source.replace('prediction = "v"',
                                              'prediction = { choice = ["eps", "v"] }')
    space = parse_space(source)
    study = optuna.create_study(directions=["minimize"] * 3,
                                sampler=make_sampler(space, "nsga2", 0, 0))
    pruner, groups, rng = MoAshaPruner(space), {}, np.random.default_rng(0)
    at_rung = 0
    distributions = space.distributions()
    for _ in range(30):
        trial = study.ask(fixed_distributions=distributions)
        config = space.decode(trial.params)
        groups[trial.number] = proxy_group(config)
        cost = Cost(param_count(config.unet), flops(config.unet), config.train.steps,
                    proxy_group=groups[trial.number])
        if not pruner.prescreen(trial.number, cost).proceed:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        m = _measurement(cost.flops / 1e6 * config.schedule.steps, cost.params / 1e5)
        pruner.on_measured(trial.number, m)
        # The loss of a v trial sits twice as high: it must not lose to the eps trials.
        loss = (2.0 if config.schedule.prediction == "v" else 1.0) * rng.uniform(0.1, 0.3)
        decision = pruner.on_rung(trial.number, RungReport(50, loss, loss, 1.0), m)
        if not decision.proceed:
            named = re.search(r"dominated by trial ([\d, ]+)", decision.reason)
            by = [int(n) for n in named.group(1).split(",") if n.strip()] if named else []
            assert by and {groups[n] for n in by} == {groups[trial.number]}, decision.reason
            at_rung += 1
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, [loss, m.latency_ms, m.sample_mb])
    assert at_rung > 0 and pruner.groups == groups
    assert len({t.params["schedule.prediction"] for t in study.trials}) == 2
    assert any(t.state == TrialState.COMPLETE for t in study.trials)
