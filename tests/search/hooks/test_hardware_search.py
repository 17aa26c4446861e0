"""Hardware-aware search on the real Ray cluster: worker latency tables, stage-0 pruning on
predicted latency, latency reported for a target device class, and mutation children that
inherit their parent's weights.

The second device class is real but lives on this machine: a node started with the label
``diffnas-device-class = fake-b`` measures its own table here, under that class name.
"""

import json

import pytest
from optuna.trial import TrialState

from search import cli
from search.hooks.hardware import TARGET_DEVICE
from search.space import load_space
from search.storage import lineage as lin
from search.storage import record as rec
from workers import RESOURCE

TABLES = {"study": {"trials": "3", "startup_trials": "3"},
          "rungs": {"min_steps": "10"},
          "unet": {"base_width": "{ choice = [8, 16] }",
                   "activation": '{ choice = ["relu", "silu"] }'},
          "schedule": {"sampler": '"ddim"', "steps": "{ int = [2, 4] }"},
          "train": {"steps": "30", "learning_rate": "{ float = [1e-3, 3e-3], log = true }",
                    "warmup_steps": "5", "eval_every": "10"}}


def _tables(study=None, **more):
    """The tables with ``study`` added to ``[study]`` and ``more`` tables."""
    return {**TABLES, "study": {**TABLES["study"], **(study or {})}, **more}


def test_stage0_prunes_on_the_latency_predicted_from_the_worker_table(
        ray_cluster, tiny_search, results, storage, capsys):
    limited = _tables({"pruner": '"constraints"'},
                      constraints={"max_latency_ms": "0.001"})  # below any prediction
    result, study = tiny_search("predicted", limited)
    assert (result.pruned, result.complete) == (3, 0)
    tables = list((results / "latency-tables").glob("*.json"))
    assert len(tables) == 1 and json.loads(tables[0].read_text())["entries"]
    for trial in study.trials:
        predicted = rec.read(trial).predicted_latency_ms
        assert predicted > 0
        assert trial.user_attrs[rec.REASON].startswith(
            f"constraints stage 0: predicted latency {predicted:.4g} ms on cpu:")
        assert trial.constraints["latency_ms"] == pytest.approx(predicted / 0.001 - 1)
        assert trial.user_attrs[rec.PRESCREEN]["predicted_latency_ms"] == predicted
        assert rec.ATTEMPTS not in trial.user_attrs  # never dispatched: no device time
    assert cli.main(["status", "predicted", "--trial", "0", "--storage", storage]) == 0
    assert '"predicted_latency_ms": ' in capsys.readouterr().out


def test_latency_measured_on_another_class_is_reported_for_the_target(
        ray_cluster, tiny_search, results):
    node = ray_cluster.add_node(num_cpus=1, resources={RESOURCE: 1, "node_fake": 1},
                                labels={"diffnas-device-class": "fake-b"})
    try:
        result, study = tiny_search("target", _tables({"target_device": '"fake-b"'}),
                                    workers=None)
    finally:
        ray_cluster.remove_node(node)
    assert result.complete == 3 and study.user_attrs[TARGET_DEVICE] == "fake-b"
    assert len(list((results / "latency-tables").glob("*.json"))) == 2  # one per class
    converted = 0
    for trial in study.trials:
        doc = trial.user_attrs[rec.CONVERSION]
        assert doc["target_device"] == "fake-b"
        assert rec.read(trial).prescreen.target_device == "fake-b"
        assert trial.values[1] == pytest.approx(doc["latency_ms"])
        assert trial.user_attrs[rec.MEASURED]["latency_ms"] == pytest.approx(doc["latency_ms"])
        if doc["device_class"] != "fake-b":
            converted += 1
            assert doc["ratio"] == pytest.approx(doc["predicted_target_ms"] / doc["predicted_ms"])
            assert doc["latency_ms"] == pytest.approx(doc["measured_ms"] * doc["ratio"])
        else:
            assert doc["latency_ms"] == doc["measured_ms"] and doc["ratio"] == 1.0
    assert converted >= 1


def test_an_unknown_target_device_is_a_one_line_error(ray_cluster, tiny_search):
    # one worker: the error comes once every worker of the search is up, and each one
    # started measures its latency table first
    with pytest.raises(ValueError, match=r"^target_device 'nope': no worker of that device "
                                         r"class \(classes here: cpu:.*\)$"):
        tiny_search("nope", _tables({"target_device": '"nope"'}), workers=1)


def test_mutation_children_inherit_their_parents_weights_and_complete(
        ray_cluster, tiny_search, tmp_path):
    result, study = tiny_search("evolve", _tables({"mutation_rate": "1.0",
                                                   "inherit_budget": "0.5"}))
    assert result.complete == 3
    first, *children = study.trials
    assert lin.PARENT not in first.user_attrs  # no front yet: the sampler's
    assert [r["step"] for r in first.user_attrs[rec.RUNGS]] == [10, 30]
    space = load_space(tmp_path / "evolve.toml")
    for child in children:
        parent = study.trials[child.user_attrs[lin.PARENT]]
        assert parent.state == TrialState.COMPLETE and parent.number < child.number
        changed = [k for k in child.params if child.params[k] != parent.params[k]]
        assert changed and child.user_attrs[lin.MUTATION].startswith(changed[0])
        space.decode(child.params)
        assert child.user_attrs[rec.INHERITANCE] == {"status": "inherited", "parent": parent.number,
                                                 "train_steps": 15}
        assert [r["step"] for r in child.user_attrs[rec.RUNGS]] == [10, 15]  # half the budget
        assert child.state == TrialState.COMPLETE
