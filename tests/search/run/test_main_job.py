"""The README's main job, end to end, as a user runs it: ``diffnas search --preset demo`` in
a fresh process (its own embedded Ray cluster, SQLite under the results folder, the
built-in digits), then ``diffnas pareto`` on the study it left. At most 10 minutes on the
2-core CPU, so it is marked slow: ``uv run pytest -m slow``."""

import subprocess
import sys

import pytest
from optuna.trial import TrialState

from search.space import load_space
from search.storage import study as st


def _diffnas(*args, cwd):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=3600)


@pytest.mark.slow
def test_the_demo_preset_runs_to_a_front(tmp_path):
    results = tmp_path / "results"
    run = _diffnas("search", "--preset", "demo", "--results", str(results), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    study = st.load_existing(st.open_storage(st.default_storage(results), create=False),
                             "demo")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    trials = load_space("demo").study.trials
    assert len(complete) == trials
    for t in complete:
        assert (results / "demo" / f"trial-{t.number}" / "checkpoint" / "ema.safetensors"
                ).is_file()
        assert t.values[0] > 0 and t.values[1] > 0 and t.values[2] > 0
    shown = _diffnas("pareto", "demo", "--results", str(results), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"non-dominated of {trials} complete trials" in shown.stdout
    assert (results / "demo" / "pareto.png").is_file()
