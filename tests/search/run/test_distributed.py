"""Searches on a real 3-node Ray cluster: smoke, every node used, a node joining, faults."""

import os
import signal

import pytest
from optuna.trial import TrialState

from engine.io.checkpoint import load_weights
from search import report_trial
from search.pruning.registry import PRUNERS
from search.run.pool import workers_text
from search.run.progress import Silent
from search.run.runner import SearchOptions, run_search
from search.storage import record as rec
from search.storage import study as st
from search.storage.artifacts import export_trial
from workers import RESOURCE, Decision


def _study(storage, name):
    return st.load_existing(st.open_storage(storage, create=False), name)


def _options(results, storage, **kw):
    return SearchOptions(**{"space": "smoke", "results": results, "storage": storage, **kw})


class Hook(Silent):
    """Runs ``action(snapshot)`` on every coordinator loop until it returns True."""

    def __init__(self, action):
        self.action, self.done = action, False

    def update(self, snapshot):
        if not self.done:
            self.done = bool(self.action(snapshot))


def test_smoke_study_with_two_workers(ray_cluster, results, storage, tmp_path):
    listed = []

    def list_workers(snapshot):
        if len(snapshot.running) == 2:
            listed.append(workers_text(None))
            return True

    result = run_search(_options(results, storage, workers=2), Hook(list_workers))
    assert (result.finished, result.complete, result.target) == (4, 4, 4)
    study = _study(storage, "smoke")
    trials = study.get_trials()
    assert len(trials) == 4 and all(len(t.values) == 3 for t in trials)
    assert len({t.user_attrs[rec.WORKER] for t in trials}) == 2
    assert result.front and result.hypervolume > 0
    for t in trials:
        folder = results / "smoke" / f"trial-{t.number}"
        assert (folder / "samples.png").is_file() and (folder / "metrics.json").is_file()
        assert (folder / "checkpoint" / "ema.safetensors").is_file()
        assert len(t.user_attrs[rec.ARTIFACT_IDS]) == 3  # registered with optuna.artifacts
        assert [r["step"] for r in t.user_attrs[rec.RUNGS]] == [10, 30]
    assert "smoke-w0: cpu" in listed[0] and "trial" in listed[0]  # `diffnas workers`
    out = export_trial(study, result.front[0], tmp_path / "export")
    config, _ = load_weights(out)  # what `diffnas sample` loads
    assert (out / "samples.png").is_file() and config.unet.image_size == 8


@pytest.mark.slow  # 3 min on 2 cores; test_smoke_study_with_two_workers covers two nodes
def test_trials_run_on_every_node_and_a_joining_node_gets_work(ray_cluster, results, storage):
    import ray

    added = []

    def join(snapshot):
        if snapshot.complete >= 1:
            added.append(ray_cluster.add_node(num_cpus=1, resources={RESOURCE: 1, "node_3": 1}))
            return True

    try:
        run_search(_options(results, storage, trials=9), Hook(join))
        nodes = {t.user_attrs[rec.NODE]["id"] for t in _study(storage, "smoke").trials}
        assert added and added[0].node_id in nodes  # the node that joined mid-study
        assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} <= nodes  # every node
    finally:
        for node in added:
            ray_cluster.remove_node(node)


def _kill_once(target):
    def action(snapshot):
        for run in snapshot.running:
            if run.phase == "training" and run.attempt == 0:
                os.kill(run.pid if target == "trial" else run.worker_pid, signal.SIGKILL)
                return True

    return action


@pytest.mark.parametrize("target", [
    # a dead trial process: tests/workers/test_walltime.py (a killed warm process) covers it fast
    pytest.param("trial", marks=pytest.mark.slow), "worker"])
def test_killed_trial_process_or_worker_is_retried(ray_cluster, results, storage, target):
    # one round on the two workers: one trial is killed, the other runs on beside it
    result = run_search(_options(results, storage, workers=2, trials=2),
                        Hook(_kill_once(target)))
    assert (result.finished, result.complete) == (2, 2)
    study = _study(storage, "smoke")
    retried = [t for t in study.trials if len(t.user_attrs[rec.ATTEMPTS]) == 2]
    assert len(retried) == 1
    first, second = retried[0].user_attrs[rec.ATTEMPTS]
    expected = "killed by SIGKILL" if target == "trial" else "died"
    assert expected in first["reason"] and second["status"] == "completed"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(t.number for t in study.trials) == [0, 1]


@pytest.mark.slow  # 3 min on 2 cores; a worker that dies mid-trial (above) takes the same path
def test_a_node_leaving_mid_trial_sends_its_trial_elsewhere(ray_cluster, results, storage):
    leaving = ray_cluster.add_node(num_cpus=1, resources={RESOURCE: 1, "node_4": 1})
    removed = []

    def leave(snapshot):
        for run in snapshot.running:
            if run.node_id == leaving.node_id and run.phase == "training":
                ray_cluster.remove_node(leaving)
                removed.append(run.number)
                return True

    try:
        result = run_search(_options(results, storage, trials=6), Hook(leave))
    finally:
        if not removed:
            ray_cluster.remove_node(leaving)
    assert removed and (result.finished, result.complete) == (6, 6)
    trial = _study(storage, "smoke").trials[removed[0]]
    first, second = trial.user_attrs[rec.ATTEMPTS]
    assert "died" in first["reason"] and second["status"] == "completed"
    assert trial.user_attrs[rec.NODE]["id"] != leaving.node_id


class ScriptedPruner:
    """Prunes trial 0 before dispatch, 1 after measuring, 2 at its first rung; keeps 3."""

    name = "scripted"

    def __init__(self, space):
        self.restored = None

    def restore(self, trials):
        self.restored = len(trials)

    def prescreen(self, number, cost):
        return Decision(number != 0, f"params {cost.params} over budget")

    def on_measured(self, number, measurement):
        return Decision(number != 1, f"latency {measurement.latency_ms:.1f} ms too slow")

    def on_rung(self, number, rung, measurement):
        return Decision(number != 2, f"dominated at step {rung.step}")


@pytest.mark.slow  # tests/search/pruning/test_mo_asha_study.py prunes at every stage, fast
def test_a_registered_pruner_decides_at_every_stage(ray_cluster, results, storage, monkeypatch):
    monkeypatch.setitem(PRUNERS, "scripted", ScriptedPruner)
    result = run_search(_options(results, storage, workers=2, pruner="scripted"))
    assert (result.complete, result.pruned) == (1, 3)
    trials = _study(storage, "smoke").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3 + [TrialState.COMPLETE]
    assert "over budget" in trials[0].user_attrs[rec.REASON]
    assert trials[1].user_attrs[rec.MEASURED]["decision"] == "prune"
    assert [r["decision"] for r in trials[2].user_attrs[rec.RUNGS]] == ["prune"]
    study = _study(storage, "smoke")
    assert "rung step 10: val_loss" in report_trial.trial_text(study, 2)
    assert "dominated at step 10" in report_trial.trial_text(study, 2)
