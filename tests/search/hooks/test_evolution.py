"""Mutation proposals are valid neighbouring candidates of the space; the front they start
from holds only feasible complete trials that kept their weights."""

import random

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from search.hooks import evolution
from search.space import _random_values, load_space
from search.storage import record as rec


@pytest.mark.parametrize("preset", ["smoke", "demo", "mac"])
def test_mutations_decode_to_valid_configs_inside_the_space(preset):
    space = load_space(preset)
    params = {p.name: p for p in space.params if p.searched}
    distributions = space.distributions()
    rng, pick = np.random.default_rng(0), random.Random(0)
    kinds = set()
    for _ in range(60):
        parent = _random_values(space, pick)
        try:
            space.decode(parent)
        except ValueError:
            continue
        child, change = evolution.propose(space, parent, rng)
        space.decode(child)  # a valid config
        assert set(child) == set(parent) and child != parent
        changed = [name for name in child if child[name] != parent[name]]
        assert change.split(" ")[0] in changed
        for name in changed:
            assert distributions[name]._contains(  # inside the space's choices and ranges
                distributions[name].to_internal_repr(child[name]))
            assert params[name].allows(params[name].decode(child[name]))
        kinds.add("morphism" if changed[0].startswith("unet.") else "step")
    searches_the_unet = any(name.startswith("unet.") for name in params)  # demo: it does not
    assert kinds == ({"morphism", "step"} if searches_the_unet else {"step"})


def test_architecture_mutations_are_morphisms_that_map_onto_the_space():
    space = load_space("smoke")  # searches base_width [8, 16] and activation [relu, silu]
    parent = {"unet.base_width": 8, "unet.activation": "relu", "schedule.sampler": "ddim",
              "schedule.steps": 2, "train.learning_rate": 2e-3}
    seen = {evolution.propose(space, parent, np.random.default_rng(s))[1] for s in range(40)}
    unet = {change for change in seen if change.startswith("unet.")}
    # widen (base_width x2) and another activation; gelu, x4 or /2 are not in the space
    assert unet == {"unet.base_width 8 -> 16", 'unet.activation "relu" -> "silu"'}
    assert seen - unet  # schedule and training parameters mutate too


def test_the_front_is_feasible_complete_trials_with_weights(tmp_path):
    study = optuna.create_study(directions=["minimize"] * 3)
    dist = {"x": CategoricalDistribution([0, 1])}
    weights = {evolution.WEIGHTS: str(tmp_path / "ema.safetensors")}

    def add(values, state=TrialState.COMPLETE, attrs=weights, constraint=-1.0):
        study.add_trial(create_trial(
            state=state, values=values if state == TrialState.COMPLETE else None,
            params={"x": 0}, distributions=dist, user_attrs={rec.ARTIFACTS: attrs},
            system_attrs={"constraints": [constraint]}))

    add([1.0, 1.0, 1.0])  # 0: front
    add([2.0, 2.0, 2.0])  # 1: dominated by 0
    add([0.5, 3.0, 1.0])  # 2: front
    add([0.1, 0.1, 0.1], constraint=1.0)  # 3: infeasible
    add([0.1, 0.1, 0.1], attrs={})  # 4: no weights
    add(None, state=TrialState.PRUNED)  # 5
    front = evolution.front(study.get_trials())
    assert [t.number for t in front] == [0, 2]
