"""distill / compress / schedule a real search trial: each result is measured and recorded
as a derived point that joins the front, without touching the search study's trials.

The CLI's failed gate runs in a real process; its bad input and export run ``search.cli.main``
in this process (tests/search/cli/test_bad_input.py runs the real process for bad input)."""

import subprocess
import sys

import pytest
from optuna.trial import TrialState

from engine.io.models import load_model
from search import report, report_trial
from search.derived import points as dv
from search.derived.operations import compress_trial, distill_front, distill_trial, schedule_trial
from search.run.progress import Silent
from search.run.runner import SearchOptions, run_search
from search.storage import record as rec
from search.storage import study as st
from search.storage.artifacts import export_trial

SPACE = """
[study]
trials = 2
seed = 0
startup_trials = 2

[data]
image_size = 8

[evaluate]
fid_samples = 32
latency_rounds = 2
grid_images = 4

[unet]
base_width = 8
width_mults = [1, 2]
norm_groups = 4
time_emb_dim = 16
activation = { choice = ["relu", "silu"] }

[schedule]
sampler = "ddim"
steps = 8
prediction = "v"

[train]
steps = 60
batch_size = 16
learning_rate = 3e-3
warmup_steps = 5
eval_every = 30
"""


@pytest.fixture(scope="module")
def searched(ray_cluster, tmp_path_factory):
    """A finished 2-trial study ``tiny`` (real workers); returns (results, storage)."""
    root = tmp_path_factory.mktemp("derived")
    space = root / "tiny.toml"
    space.write_text(SPACE)
    results = root / "results"
    storage = f"sqlite:///{results / 'diffnas.db'}"
    result = run_search(SearchOptions(space=space, results=results, storage=storage,
                                      workers=2), Silent())  # one per trial
    assert result.complete == 2
    return results, storage


def _study(storage):
    return st.load_existing(st.open_storage(storage, create=False), "tiny")


def _quiet(_):
    pass


def test_distill_records_a_point_on_the_front(searched, tmp_path):
    results, storage = searched
    study = _study(storage)
    before = [(t.number, t.state) for t in study.get_trials()]
    label, result = distill_trial(dv.source(study, "0"), "progressive", 2, results,
                                  teacher_steps=8, max_fid_ratio=100.0, retries=0,
                                  train_steps=4, batch_size=8, emit=_quiet)
    assert label is not None and label.startswith("d")
    assert [r.steps for r in result.stages] == [8, 4, 2] and result.final.steps == 2
    point = dv.source(study, label).trial
    assert point.user_attrs[rec.DERIVED]["kind"] == "distill"
    assert point.user_attrs[rec.DERIVED]["source"] == "0"
    assert point.user_attrs[rec.CONFIG]["schedule"]["steps"] == 2
    assert point.values[0] == pytest.approx(point.user_attrs[rec.QUALITY]["fid"])
    m = point.user_attrs[rec.MEASURED]
    assert point.values[1] == pytest.approx(m["source_latency_ms"] * m["latency_ratio"])
    source_mb = dv.source(study, "0").trial.user_attrs[rec.MEASURED]["sample_mb"]
    assert point.values[2] == pytest.approx(
        source_mb + m["sample_mb_here"] - m["source_sample_mb_here"])
    # the search study itself is untouched: its sampler never sees the derived point
    assert [(t.number, t.state) for t in _study(storage).get_trials()] == before
    front = report.front(_study(storage))
    assert label in front.labels and "0" in front.labels
    assert f"derived ({'distill'}) from trial 0" in report_trial.trial_text(_study(storage), label)
    out = export_trial(dv.companion(study), int(label[1:]), tmp_path / "export")
    config, _ = load_model(out)  # what `diffnas sample` loads
    assert config.schedule.steps == 2


def test_schedule_records_optimized_times(searched):
    results, storage = searched
    # a 0.5 s optimisation (it stops at its time limit): what is checked is the schedule
    # recorded, not how far its error fell
    label = schedule_trial(dv.source(_study(storage), "1"), 3, results, seconds=0.5, batch=8,
                           emit=_quiet)
    point = dv.source(_study(storage), label)
    config, _ = load_model(point.folder)
    s = config.schedule
    assert (s.spacing, s.steps, len(s.timesteps)) == ("optimized", 3, 3)
    assert list(s.timesteps) == point.trial.user_attrs[rec.DERIVED]["detail"]["times"]
    assert point.trial.user_attrs[rec.MEASURED]["latency_here_ms"] > 0


def test_compress_records_a_smaller_model(searched):
    results, storage = searched
    label, result = compress_trial(dv.source(_study(storage), "0"), 10.0, results, ("cast",),
                                   emit=_quiet)
    assert label is not None and result.recipe
    detail = dv.source(_study(storage), label).trial.user_attrs[rec.DERIVED]["detail"]
    assert detail["size_mb"] < 0.6 * detail["baseline_size_mb"]  # float16 halves the weights
    assert detail["what"] == "compressed: cast bfloat16"  # the last kept level of the method


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_failed_gate_records_nothing_and_bad_input_is_one_line(searched, in_process):
    results, storage = searched
    n_before = len(dv.companion(_study(storage)).trials)
    proc = _cli("distill", "tiny", "0", "--steps", "4", "--teacher-steps", "8",
                "--train-steps", "2", "--batch-size", "4", "--max-fid-ratio", "0.001",
                "--retries", "0", "--results", results)  # the real process
    assert proc.returncode == 1, proc.stderr
    assert "no stage passed its gate" in proc.stderr
    assert len(dv.companion(_study(storage)).trials) == n_before
    for args, fragment in [(("distill", "tiny", "7"), "has no trial 7"),
                           (("compress", "tiny", "d99"), "has no derived point d99"),
                           (("schedule", "tiny", "x1", "--steps", "3"), "give a trial number"),
                           (("distill", "tiny", "0", "--steps", "3", "--teacher-steps", "8"),
                            "teacher_steps")]:
        proc = in_process(*args, "--results", results)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert all(t.state == TrialState.COMPLETE for t in _study(storage).get_trials())
    proc = in_process("export", "tiny", "d0", "--out", results / "d0", "--results",
                       results)
    assert proc.returncode == 0, proc.stderr
    config, _ = load_model(results / "d0")
    assert config.schedule.steps == 2  # d0 is the 2-step student


def test_distill_front_takes_the_lowest_fid_front_trials(searched):
    results, storage = searched
    study = _study(storage)
    front = report.front(study)
    searched_front = [(front.points[i, 0], front.labels[i]) for i in range(len(front.labels))
                      if front.on_front[i] and not front.labels[i].startswith("d")]
    done = distill_front(study, 1, "progressive", 2, results, teacher_steps=8,
                         max_fid_ratio=100.0, retries=0, train_steps=2, batch_size=8,
                         emit=_quiet)
    assert [source for source, _ in done] == [min(searched_front)[1]]
    assert done[0][1] is not None
    assert dv.source(_study(storage), done[0][1]).trial.user_attrs[rec.DERIVED]["source"] == \
        done[0][0]
