"""Hardware-aware step budget: ``diffnas search --max-latency-ms`` on real Ray workers, and
the new schedule options of the presets (spacings, the adaptive sampler's tolerance)."""

import json
import math
from pathlib import Path

import pytest
from optuna.trial import TrialState

from engine.config import Config
from search import cli
from search.run.dataset import build_payload
from search.space import load_space
from search.storage import record as rec
from search.storage import study as st
from workers.process import run_in_child
from workers.records import Decision, Outcome, TrialRequest

TABLES = {"schedule": {"sampler": '{ choice = ["ddim", "adaptive"] }',
                       "steps": "{ int = [3, 6] }",
                       "spacing": '{ choice = ["quadratic", "karras"] }',
                       "tolerance": "{ float = [0.01, 0.1], log = true }"},
          "train": {"steps": "10", "warmup_steps": "2", "eval_every": "10"}}
FIXED = {"schedule.sampler": "ddim", "schedule.steps": 3, "schedule.spacing": "quadratic",
         "schedule.tolerance": 0.05}
ADAPTIVE = {**FIXED, "schedule.sampler": "adaptive", "schedule.spacing": "karras"}
TARGET_MS = 40.0  # tens of network evaluations of this 8 px U-Net on a 2-core CPU


def _search(tiny_search, name, target_ms):
    _, study = tiny_search(name, TABLES, FIXED, ADAPTIVE, max_latency_ms=target_ms)
    return study.trials


def test_each_trial_samples_with_the_most_steps_that_fit_the_target(ray_cluster, tiny_search):
    fixed, adaptive = _search(tiny_search, "budget", TARGET_MS)
    for trial in (fixed, adaptive):
        assert trial.state == TrialState.COMPLETE
        budget = trial.user_attrs[rec.STEP_BUDGET]
        last = budget["rounds"][-1]
        # The chooser's arithmetic on the numbers measured on the worker's device.
        assert budget["steps"] == math.floor(
            (TARGET_MS - budget["overhead_ms"]) / last["per_step_ms"])
        assert budget["predicted_ms"] <= TARGET_MS and budget["steps"] >= 1
        assert budget["target_ms"] == TARGET_MS and budget["per_eval_ms"] > 0
        # The latency objective is measured with the chosen schedule, which the trial keeps.
        schedule = rec.read(trial).config.schedule
        assert (schedule.sampler, schedule.steps) == (budget["sampler"], budget["steps"])
        measurement = trial.user_attrs[rec.MEASURED]
        # A disturbed latency is measured again at the trial's end (the record keeps both
        # attempts); the budget was chosen on the first.
        attempts = measurement["latency_attempts"]
        first = attempts[0]["latency_ms"] if attempts else measurement["latency_ms"]
        assert first == budget["measured_ms"]
        assert measurement["latency_ms"] == trial.values[1]
        assert measurement["budget"]["reason"] == budget["reason"]
        assert trial.constraints["latency_target_ms"] == pytest.approx(
            trial.values[1] / TARGET_MS - 1)
        saved = json.loads(Path(trial.user_attrs[rec.ARTIFACTS]["checkpoint/config.json"])
                           .read_text())
        assert Config.from_dict(saved["config"]).schedule == schedule
    assert rec.read(fixed).config.schedule.sampler in ("ddim", "dpmpp_2m")
    # The adaptive sampler keeps itself, its steps capping its evaluations, where 3 fit on
    # the worker's device; below that the budget's fixed sampler replaces it.
    kept = rec.read(adaptive).config.schedule
    steps = adaptive.user_attrs[rec.STEP_BUDGET]["steps"]
    assert kept.sampler == ("adaptive" if steps >= 3 else "ddim") and kept.tolerance == 0.05


def test_a_candidate_that_cannot_fit_one_step_is_infeasible(ray_cluster, tiny_search):
    trials = _search(tiny_search, "tight", 1e-3)
    for trial in trials:
        assert trial.state == TrialState.PRUNED
        assert "latency target: max latency 0.0 ms is below one network evaluation" in (
            trial.user_attrs[rec.REASON])
        assert trial.constraints["latency_target_ms"] > 0 and not st.feasible(trial)
        assert rec.RUNGS not in trial.user_attrs


def test_a_bad_latency_target_is_a_one_line_error(results, capsys):
    code = cli.main(["search", "--preset", "smoke", "--results", str(results),
                     "--max-latency-ms", "-5"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "diffnas: error: --max-latency-ms: must be > 0, got -5")
    assert not results.exists()  # nothing was written


# demo is left out: its space is narrowed to the samplers and spacings that drew legible
# digits (benchmarks/legibility.md); the mac preset keeps the whole menu.
@pytest.mark.parametrize("preset", ["mac"])
def test_presets_search_the_spacings_and_the_adaptive_tolerance(preset):
    space = load_space(preset)
    params = {p.name: p for p in space.params}
    assert set(params["schedule.spacing"].choices) == {"trailing", "uniform", "quadratic",
                                                       "karras"}
    assert "adaptive" in params["schedule.sampler"].choices
    assert params["schedule.tolerance"].kind == "float"


@pytest.mark.parametrize("schedule", [
    # the adaptive sampler's error control runs unguided; ddim runs guided (the demo's labels)
    {"schedule.sampler": "adaptive", "schedule.tolerance": 0.08, "schedule.steps": 6,
     "schedule.guidance": 1.0},
    {"schedule.sampler": "ddim", "schedule.spacing": "quadratic", "schedule.steps": 4,
     "schedule.guidance": 2.0}])
def test_a_demo_trial_with_the_new_schedule_options_runs(schedule, tmp_path):
    space = load_space("demo")
    values = {"unet.base_width": 16, "unet.width_mults": "[1, 2]", "unet.attn_levels": "[]",
              "unet.activation": "relu", "schedule.spacing": "karras",
              "schedule.beta_schedule": "cosine", "schedule.prediction": "eps",
              "schedule.tolerance": 0.02, "train.learning_rate": 2e-3, **schedule}
    config = space.decode(values)
    # 2 training steps: what is checked is that the trial completes with its schedule kept
    # and a finite FID, none of which needs a trained model (10 steps cost 3-4 s more)
    request = TrialRequest(0, 0, config.to_dict(), (2,), fid_samples=16, grid_images=4,
                           latency_rounds=2)
    outcome = run_in_child(request, build_payload(space.data, tmp_path),
                           lambda kind, payload, needs: Decision())
    assert outcome.status is Outcome.COMPLETED, outcome.reason
    assert outcome.metrics["config"]["schedule"] == config.to_dict()["schedule"]
    assert math.isfinite(outcome.values["fid"])
