"""A smoke study with ``mo-asha`` on the Ray cluster: every stage prunes once, the reasons
are stored and explained by ``diffnas status --trial N``, and a resumed study continues
with the rung history of the first run."""

from optuna.trial import TrialState

from search import cli
from search.run.runner import SearchOptions, run_search
from search.space import load_space
from search.storage import record as rec
from search.storage import study as st

# Chosen so that each decision is certain, whatever the machine's load: memory is the
# training peak (no timing noise), and the dominated trials lose on every objective.
SPACE = """
[data]
image_size = 8

[study]
trials = 4
pruner = "mo-asha"
startup_trials = 4

[rungs]
min_steps = 10          # rungs at 10 (a decision) and 30 (the end)
eta = 3

[constraints]
max_params = 100_000    # base_width 16 has 149k
max_memory_mb = 12      # batch 64 peaks near 20 MB in training, batch 8 near 3 MB

[evaluate]
fid_samples = 16
latency_rounds = 2
grid_images = 4
memory = "train"

[unet]
base_width = { choice = [8, 16] }
width_mults = [1, 2]
norm_groups = 4
time_emb_dim = 32

[schedule]
sampler = "ddim"
steps = { choice = [2, 16] }

[train]
steps = 30
batch_size = { choice = [8, 16, 64] }
learning_rate = { choice = [1e-6, 3e-3] }
warmup_steps = 5
eval_every = 30         # the rung at 10 falls between two evaluations: the worker evaluates
"""
GOOD = {"unet.base_width": 8, "schedule.steps": 2, "train.batch_size": 8,
        "train.learning_rate": 3e-3}
# 8x the sampling steps, twice the batch (memory), a learning rate that learns nothing
DOMINATED = {**GOOD, "schedule.steps": 16, "train.batch_size": 16, "train.learning_rate": 1e-6}


def _status(capsys, storage, number):
    assert cli.main(["status", "mo", "--trial", str(number), "--storage", storage]) == 0
    return capsys.readouterr().out


def test_mo_asha_prunes_at_every_stage_and_resumes_with_its_history(
        ray_cluster, results, storage, tmp_path, capsys):
    path = tmp_path / "mo.toml"
    path.write_text(SPACE)
    study, _, _ = st.open_study(st.open_storage(storage, create=True), "mo", load_space(path))
    for params in (GOOD, {**GOOD, "unet.base_width": 16}, DOMINATED,
                   {**GOOD, "train.batch_size": 64}):
        study.enqueue_trial(params)
    options = SearchOptions(space=path, study="mo", results=results, storage=storage,
                            workers=1)
    first = run_search(options)
    assert (first.complete, first.pruned) == (1, 3)
    trials = st.load_existing(st.open_storage(storage, create=False), "mo").trials
    assert trials[0].state == TrialState.COMPLETE
    assert [r["decision"] for r in trials[0].user_attrs[rec.RUNGS]] == ["continue"] * 2
    assert "over the limit 100,000" in trials[1].user_attrs[rec.REASON]  # stage 0
    assert trials[1].user_attrs[rec.PRESCREEN]["decision"] == "prune"
    assert trials[1].constraints["params"] > 0 and rec.ATTEMPTS not in trials[1].user_attrs
    (rung,) = trials[2].user_attrs[rec.RUNGS]  # stage 2, at the first rung
    assert rung["step"] == 10 and rung["decision"] == "prune"
    assert "dominated by trial 0" in trials[2].user_attrs[rec.REASON]
    assert trials[2].user_attrs[rec.TIMINGS]["cpu_s"] > 0  # a pruned trial's device cost
    assert "memory_mb" in trials[3].user_attrs[rec.REASON]  # stage 1
    assert trials[3].user_attrs[rec.MEASURED]["decision"] == "prune"
    assert trials[3].constraints["memory_mb"] > 0 and rec.RUNGS not in trials[3].user_attrs
    shown = _status(capsys, storage, 2)
    assert "PRUNED -- mo-asha step 10: 2 of 2 (front 1, dominated by trial 0)" in shown
    assert "rung step 10: val_loss" in shown and "-> prune (mo-asha step 10" in shown

    # Resume: only a restored history knows trials 0 and 2 reached step 10 before.
    study.enqueue_trial(DOMINATED)
    second = run_search(SearchOptions(**{**options.__dict__, "trials": 5}))
    assert second.resumed and (second.complete, second.pruned) == (1, 4)
    again = st.load_existing(st.open_storage(storage, create=False), "mo").trials[4]
    assert again.state == TrialState.PRUNED
    assert " of 3 (front " in again.user_attrs[rec.REASON]  # trials 0, 2 and 4 at step 10
    assert "dominated by trial 0" in _status(capsys, storage, 4)
