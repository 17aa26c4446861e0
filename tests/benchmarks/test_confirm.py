"""benchmarks/searchbench confirm.py: the live table trains a (tiny) proposal as a real
trial, stops it where the arm's pruner stops it, and reads stored trials back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "searchbench"
sys.path.insert(0, str(BENCH))

import arms
import confirm
import live
import plan
import record

from search.pruning.base import ConstraintPruner, NoPruner
from search.space import SearchSpace, load_space
from workers.records import DataPayload

TINY = """
[study]
trials = 10
sampler = "tpe"
seed = 0
pruner = "none"
startup_trials = 2
latency_table = false

[data]
dataset = "digits"
image_size = 8

[evaluate]
fid_samples = 8
grid_images = 4
memory = "sample"

[rungs]
min_steps = 2
eta = 2

[constraints]
max_latency_ms = {limit}

[unet]
base_width = 8
width_mults = [1]
attn_levels = []
norm_groups = 4
activation = {{ choice = ["relu", "silu"] }}

[schedule]
sampler = "ddim"
steps = {{ int = [2, 3] }}

[train]
steps = 4
batch_size = 4
learning_rate = {{ float = [1e-3, 2e-3], log = true }}
warmup_steps = 1
eval_every = 4
"""
PARAMS = {"unet.activation": "relu", "schedule.steps": 2, "train.learning_rate": 1.5e-3}


def tiny(tmp_path: Path, limit: float) -> tuple[SearchSpace, dict[str, Any]]:
    path = tmp_path / f"space-{limit}.toml"
    path.write_text(TINY.format(limit=limit))
    space = load_space(path)
    doc = {"space_sha256": "tiny", "data": vars(space.data), "evaluate": vars(space.evaluate),
           "limits": space.constraints.limits()}
    return space, doc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataPayload:
    space, _ = tiny(tmp_path_factory.mktemp("space"), 1000)
    return record.payload(vars(space.data), record.CACHE)


@pytest.mark.slow  # trains a real trial (45 s); the next test runs a live trial too
def test_live_table_trains_a_proposal_and_reuses_it(tmp_path: Path, data: DataPayload) -> None:
    space, doc = tiny(tmp_path, 1000)
    trials = tmp_path / "trials.jsonl"
    table = live.LiveTable(space, doc, data, "nsga2", trials)
    assert table.nearest(PARAMS) == (0, 0.0)
    row = table.rows[0]
    assert row.status == "completed" and row.values is not None
    assert [r.step for r in row.rungs] == [2, 4]
    cpu = [row.cpu_measured, *row.rung_cpu, row.cpu_end]
    assert cpu == sorted(cpu) and cpu[0] > 0
    assert arms.play(row, 0, arms.PrunerStopper(NoPruner(space))) == ("complete", row.cpu_end)
    assert table.nearest(dict(PARAMS)) == (1, 0.0), "a repeated config is not trained again"
    assert (table.trained, table.reused) == (1, 1) and table.rows[1].values == row.values
    lines = [json.loads(line) for line in trials.read_text().splitlines()]
    assert [(d["id"], d["stop"]) for d in lines] == [(0, "complete"), (1, "complete")]


def test_live_trial_stops_where_the_pruner_stops(tmp_path: Path, data: DataPayload) -> None:
    space, doc = tiny(tmp_path, 1e-6)  # every latency is over: stop after the measurement
    trials = tmp_path / "trials.jsonl"
    table = live.LiveTable(space, doc, data, "constraints", trials)
    table.nearest(PARAMS)
    row = table.rows[0]
    assert row.status == "pruned" and row.rungs == () and row.measurement is not None
    assert table.stops == ["stage1"]
    stopper = arms.PrunerStopper(ConstraintPruner(space))
    assert arms.play(row, 0, stopper) == ("stage1", row.cpu_measured)
    again = live.LiveTable(space, doc, data, "constraints", trials)
    again.nearest(PARAMS)
    assert (again.trained, again.reused) == (0, 1), "a stored trial is read back on resume"
    assert again.rows[0].cpu_measured == row.cpu_measured


def test_trial_processes_import_no_optuna_or_search() -> None:
    """A live trial's process re-imports confirm.py (spawn): it must cost what a recorded
    trial's start-up did, so confirm.py imports what record.py imports."""
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import confirm; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'optuna', 'sqlalchemy', 'search'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_confirm_names_a_missing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    missing = tmp_path / "none.jsonl"
    assert confirm.main(["--results", str(missing), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("confirm: ") and str(missing) in err and "\n" not in err


def test_heldout_plan_fits_its_recording_run() -> None:
    doc = plan.plan(plan.BENCHES["heldout"].space, plan.BENCHES["heldout"].n, 0,
                    plan.HELDOUT_CORNERS)
    assert len(doc["configs"]) >= 60
    assert doc["params_fingerprint"] == json.loads(
        (BENCH / "heldout" / "configs.json").read_text())["params_fingerprint"]
