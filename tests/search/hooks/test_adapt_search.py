"""Adaptation during a real search (Ray cluster, SQLite, MLX training on the digits): a
trial over the latency budget shrinks, one on a plateau grows; each continues as a new
trial that starts from its weights and trains the steps it had left."""

import pytest
from optuna.trial import TrialState

from search.report_trial import trial_text
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage.artifacts import WEIGHTS

TABLES = {"rungs": {"min_steps": "10"},
          "unet": {"base_width": "{ choice = [8, 16] }", "activation": '"relu"'},
          "schedule": {"sampler": '"ddim"', "steps": "2"},
          "train": {"steps": "30", "learning_rate": "2e-3", "warmup_steps": "5",
                    "eval_every": "5"}}


@pytest.mark.parametrize(("adapt", "start", "end", "trigger", "extra", "at_step"), [
    ({"shrink_above_ms": "0.001"}, 16, 8, "latency", {}, 10),
    # validation only at the end: the plateau is judged on the rungs' points (10, 20)
    ({"grow": "true", "plateau": "1.0", "patience": "1", "target_loss": "0.0"}, 8, 16,
     "plateaued", {"rungs": {"min_steps": "10", "eta": "2"},
                   "train": {**TABLES["train"], "eval_every": "30"}}, 20)])
def test_a_trial_adapts_into_a_new_trial_that_starts_from_its_weights(
        ray_cluster, tiny_search, adapt, start, end, trigger, extra, at_step):
    kind = "shrink" if start > end else "grow"
    tables = {**TABLES, **extra, "adapt": {**adapt, "max_depth": "1"}}
    result, study = tiny_search(kind, tables, {"unet.base_width": start})
    assert (result.complete, result.pruned, result.failed) == (1, 1, 0)
    parent, child = study.trials
    assert parent.state == TrialState.PRUNED and child.state == TrialState.COMPLETE
    assert parent.params["unet.base_width"] == start
    assert child.params["unet.base_width"] == end
    *before, rung = parent.user_attrs[rec.RUNGS]  # stopped at a rung, checkpoint kept
    assert all(r["decision"] == "continue" for r in before)
    assert (rung["step"], rung["decision"]) == (at_step, "adapt") and trigger in rung["reason"]
    assert WEIGHTS in parent.user_attrs[rec.ARTIFACTS]
    assert parent.user_attrs[lin.ADAPTED_INTO]["trial"] == child.number
    assert child.user_attrs[lin.PARENT] == parent.number
    assert child.user_attrs[lin.MUTATION] == f"{kind}: unet.base_width {start} -> {end}"
    doc = child.user_attrs[lin.ADAPTATION]
    left = 30 - at_step
    assert (doc["trigger"], doc["at_step"], doc["steps"], doc["depth"]) == (kind, at_step,
                                                                            left, 1)
    assert child.user_attrs[rec.INHERITANCE] == {"status": "inherited", "parent": parent.number,
                                             "train_steps": left}
    assert child.user_attrs[rec.RUNGS][-1]["step"] == left  # trains the steps left
    assert all(r["decision"] == "continue" for r in child.user_attrs[rec.RUNGS])  # max_depth
    shown = trial_text(study, str(child.number))
    assert f"adapted ({kind}) from trial {parent.number} at its step {at_step}" in shown
    assert f"continued as trial {child.number} ({kind}: " in trial_text(study, "0")
