"""``diffnas legibility`` and ``benchmarks/legibility.py``: the best front trial's samples,
scored as the engine scores them, on one real (tiny) study."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.datasets import load_dataset
from engine.io.models import load_model
from engine.measure import sample_images
from engine.quality.features import DIGITS_HOLDOUT, digits_feature_network
from engine.quality.legibility import legible, typical_set
from search import cli, report
from search.derived.points import source
from search.legibility import held_out_digits
from search.storage import study as st

BENCH = Path(__file__).parents[3] / "benchmarks" / "legibility.py"


def diffnas(*args):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


def bench(*args):
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True,
                          text=True, timeout=600, check=False)


def _bench_module():
    """``benchmarks/legibility.py`` loaded as a module (its ``main`` is the script's)."""
    spec = importlib.util.spec_from_file_location("legibility_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shares(stdout):
    """``[(confident, legible), ...]`` in printed order: the samples, then real digits."""
    return [(float(c) / 100, float(g) / 100) for c, g in
            re.findall(r"([\d.]+)% confident .*?, ([\d.]+)% legible", stdout)]


def _engine_shares(study, label, n):
    """The oracle: the trial's model sampled and scored with the engine alone."""
    config, model = load_model(source(study, label).folder)
    net = digits_feature_network()
    seen, held = load_dataset("digits", image_size=config.unet.image_size).split(*DIGITS_HOLDOUT)
    typical = typical_set(net, seen.images, seen.labels)
    return [(legible(x, net).mean(), legible(x, net, typical).mean())
            for x in (sample_images(model, config, n, 0), held_out_digits(held.images, n))]


def test_scores_the_front_trial_of_lowest_fid(smoke_study, tmp_path, capsys):
    # The session's finished smoke study (tests/search/conftest.py): 4 trials and a d0.
    results = smoke_study[0]
    storage = st.default_storage(results)
    study = st.load_existing(st.open_storage(storage, create=False), "smoke")
    front = report.front(study, st.stored_space(study))
    on = np.flatnonzero(front.on_front)
    best = front.labels[on[np.argmin(front.points[on, 0])]]
    png = tmp_path / "grid.png"
    run = diffnas("legibility", "smoke", "--results", results, "--storage", storage, "--n", 30,
                  "--png", png)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"study smoke, trial {best}: FID {front.points[on, 0].min():.3g}" in run.stdout
    assert np.allclose(_shares(run.stdout), _engine_shares(study, best, 30), atol=0.0005)
    with Image.open(png) as grid:  # rows of 10 tiles of 8 px, 1 px apart, scaled 2x
        assert grid.size == (2 * (10 * 9 + 1), 2 * (3 * 9 + 1))
    other = next(label for label in front.labels if label != best)
    code = cli.main(["legibility", "smoke", "--trial", other, "--results", str(results),
                     "--storage", storage, "--n", "10"])  # in this process: no interpreter start
    shown = capsys.readouterr()
    assert code == 0, shown.err[-2000:]
    assert f"trial {other}: FID" in shown.out
    assert np.allclose(_shares(shown.out), _engine_shares(study, other, 10), atol=0.0005)
    code = _bench_module().main(["--study", "smoke", "--results", str(results), "--storage",
                                 storage, "--n", "30"])  # in this process, as above
    shown = capsys.readouterr()
    assert code == 0, shown.err[-2000:]  # the benchmark scores the same trial
    assert f"trial {best}: FID" in shown.out and "study wall time" in shown.out


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffnas: error: "), proc.stderr
    assert fragment in lines[0]


def test_bad_input_is_one_line(existing, results, tmp_path, in_process):
    # one real process (no traceback reaches the terminal), the rest in this one
    _one_line_error(diffnas("legibility", "nope", "--results", results), "unknown study 'nope'")
    run = bench("--study", "nope", "--results", results)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "nope" in run.stderr
    _one_line_error(in_process("legibility", "smoke", "--results", results),
                    "no feasible COMPLETE trial")
    _one_line_error(in_process("legibility", "smoke", "--trial", "x7", "--results",
                                results), "x7")
    _one_line_error(in_process("legibility", "smoke", "--n", "0", "--results", results),
                    "--n")
    _one_line_error(in_process("legibility", "smoke", "--png", tmp_path, "--results",
                                results), "--png")
