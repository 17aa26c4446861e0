"""benchmarks/legibility.py on a real (tiny) study: it scores the front's lowest-FID trial."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
from PIL import Image

from search import report
from search.storage import study as st

LEARNING_RATE = "{ float = [1e-3, 3e-3], log = true }"  # a space must search something

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "legibility.py"


def _bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=600)


def test_scores_the_front_trial_of_lowest_fid(tiny_search, results, storage, tmp_path):
    _, study = tiny_search("leg", {"study": {"trials": "3", "startup_trials": "3"},
                                   "train": {"steps": "20", "learning_rate": LEARNING_RATE}})
    front = report.front(study, st.stored_space(study))
    on = np.flatnonzero(front.on_front)
    best = front.labels[on[np.argmin(front.points[on, 0])]]
    png = tmp_path / "grid.png"
    run = _bench("--study", "leg", "--results", results, "--storage", storage, "--n", 30,
                 "--png", png)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"trial {best}: FID {front.points[on, 0].min():.3g}" in run.stdout
    shares = re.findall(r"([\d.]+)% legible .* of 30;", run.stdout)
    assert len(shares) == 2 and all(0.0 <= float(s) <= 100.0 for s in shares)
    assert "study wall time" in run.stdout
    with Image.open(png) as grid:  # rows of 10 tiles of 8 px, 1 px apart, scaled 2x
        assert grid.size == (2 * (10 * 9 + 1), 2 * (3 * 9 + 1))


def test_an_unknown_study_is_a_one_line_error(results, storage):
    optuna.create_study(storage=st.open_storage(storage, create=True), study_name="other")
    run = _bench("--study", "nope", "--results", results, "--storage", storage)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "nope" in run.stderr
