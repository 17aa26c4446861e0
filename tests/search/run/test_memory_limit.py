"""A per-trial memory limit on a real Ray worker: a candidate predicted over it and one
measured over it end as infeasible with their reason, and the same worker goes on to
complete the next trial."""

from optuna.trial import TrialState

from search.run.runner import SearchOptions, run_search
from search.space import load_space
from search.storage import record as rec
from search.storage import study as st

# The predictor (engine.device.memory) puts batch 1024 near 330 MB: over before anything runs.
# Base width 64 trains at batch 8 well inside the limit (about 60 MB) but sampling the
# 250 FID images peaks near 390 MB: measured over at the evaluation. Base width 8 at
# batch 8 peaks near 15 MB.
SPACE = """
[data]
image_size = 8

[study]
trials = 3
startup_trials = 3

[evaluate]
fid_samples = 250
latency_rounds = 2
grid_images = 4

[constraints]
max_trial_memory_mb = 150

[unet]
base_width = { choice = [8, 64] }
width_mults = [1, 2]
norm_groups = 4
time_emb_dim = 32

[schedule]
sampler = "ddim"
steps = 2

[train]
steps = 5               # the peaks do not depend on how long it trains
batch_size = { choice = [8, 1024] }
warmup_steps = 2
eval_every = 5
"""
PREDICTED_OVER = {"unet.base_width": 8, "train.batch_size": 1024}
MEASURED_OVER = {"unet.base_width": 64, "train.batch_size": 8}
FITS = {"unet.base_width": 8, "train.batch_size": 8}


def test_over_limit_trials_are_infeasible_and_the_worker_runs_the_next(
        ray_cluster, results, storage, tmp_path):
    path = tmp_path / "mem.toml"
    path.write_text(SPACE)
    study, _, _ = st.open_study(st.open_storage(storage, create=True), "mem", load_space(path))
    for params in (PREDICTED_OVER, MEASURED_OVER, FITS):
        study.enqueue_trial(params)
    result = run_search(SearchOptions(space=path, study="mem", results=results,
                                      storage=storage, workers=1))
    assert (result.complete, result.pruned, result.failed) == (1, 2, 0)
    predicted, measured, fits = st.load_existing(
        st.open_storage(storage, create=False), "mem").trials

    assert predicted.state == TrialState.PRUNED
    reason = predicted.user_attrs[rec.REASON]
    assert "over the trial memory limit" in reason and "predicted" in reason
    assert "exceeds the budget of 150 MB" in reason
    assert predicted.constraints["trial_memory_mb"] > 0 and not st.feasible(predicted)
    assert rec.MEASURED not in predicted.user_attrs  # ended before any measurement

    assert measured.state == TrialState.PRUNED
    reason = measured.user_attrs[rec.REASON]
    assert "measured" in reason and "exceeds the budget of 150 MB" in reason
    assert measured.constraints["trial_memory_mb"] > 0 and not st.feasible(measured)

    assert fits.state == TrialState.COMPLETE and st.feasible(fits)
    assert -1 < fits.constraints["trial_memory_mb"] <= 0  # its measured peak, under the limit
    workers = {t.user_attrs[rec.WORKER] for t in (predicted, measured, fits)}
    assert len(workers) == 1  # the same worker survived both and ran the next trial
