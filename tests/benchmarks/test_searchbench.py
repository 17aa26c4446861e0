"""benchmarks/searchbench: the record step on a real (tiny) trial, and the replay of the
diffnas arms on a small SYNTHETIC table generated here (never shipped as results)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "searchbench"
sys.path.insert(0, str(BENCH))

import arms
import plan
import record
import replay
from recorded import Table, load_table

FORBIDDEN = ("ray", "optuna", "sqlalchemy", "search")


def synthetic_row(entry: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A made-up row for a planned config: costs grow with FLOPs and steps, quality with
    the learning rate's distance from 2e-3. SYNTHETIC: it tests the replay only."""
    params, cost = entry["params"], entry["cost"]
    steps = params["schedule.steps"] * (1.5 if params["schedule.sampler"] == "adaptive" else 1)
    latency = cost["flops"] / 1e6 * steps * 0.12 * rng.uniform(0.9, 1.1)
    memory = cost["params"] / 1.5e5 + rng.uniform(0, 0.5)
    final = 0.18 + 0.05 * abs(math.log(params["train.learning_rate"] / 2e-3)) + rng.normal(0, 0.01)
    measured = 0.6 + cost["flops"] / 2e7
    per_step = cost["flops"] / 4e8
    rungs = [{"step": s, "val_loss": final * g, "train_loss": final * g, "elapsed_s": s * 0.1,
              "cpu_s": measured + s * per_step} for s, g in zip(entry["rungs"], (1.3, 1.08, 1.0))]
    failed = rng.random() < 0.05
    if failed:
        rungs = rungs[:1]
    fid = 5 + 60 * (final - 0.15) + 20 / steps + rng.normal(0, 0.5)
    return {"id": entry["id"], "synthetic": True, "params": params,
            "status": "failed" if failed else "completed", "cost": cost,
            "measurement": {"latency_ms": latency, "latency_spread": 0.01,
                            "latency_samples_ms": [latency] * 5, "train_mb": memory * 20,
                            "sample_mb": memory, "seconds": measured - 0.6},
            "rungs": rungs, "cpu_s": {"start": 0.6, "measured": measured,
                                      "end": rungs[-1]["cpu_s"] + 3.0},
            "values": None if failed else {"fid": fid, "latency_ms": latency,
                                           "peak_mem_mb": memory}}


@pytest.fixture(scope="module")
def table_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("searchbench")
    doc = plan.plan(BENCH / "space.toml", 48, 0)
    (folder / "configs.json").write_text(json.dumps(doc))
    rng = np.random.default_rng(0)
    rows = [synthetic_row(e, rng) for e in doc["configs"]]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "results.jsonl", folder / "configs.json"


@pytest.fixture(scope="module")
def table(table_files: tuple[Path, Path]) -> Table:
    return load_table(table_files[0], BENCH / "space.toml", table_files[1])


def stage_cost(table: Table, played: arms.Played) -> float:
    row = table.rows[played.row]
    if played.stop == "stage0":
        return 0.0
    if played.stop == "stage1":
        return row.cpu_measured
    if played.stop.startswith("rung"):
        step = int(played.stop.split()[1])
        return row.rung_cpu[[r.step for r in row.rungs].index(step)]
    return row.cpu_end


def test_plan_spreads_over_the_space_with_its_corners() -> None:
    doc = plan.plan(BENCH / "space.toml", 32, 0)
    widths = {e["params"]["unet.base_width"] for e in doc["configs"]}
    over = [e for e in doc["configs"] if e["cost"]["params"] > doc["limits"]["params"]]
    assert widths == {16, 32} and over, "the infeasible corners are planned"
    assert len(doc["configs"]) == 32 + 16 - doc["duplicates_dropped"] - doc["invalid_dropped"]


@pytest.mark.parametrize("arm", ["constraints", "mo-asha"])
def test_replayed_costs_add_up_to_the_budget(table: Table, arm: str) -> None:
    budget = 10 * table.full_cost()
    played = arms.run_arm(arm, table, 0, budget)
    costs = [p.cost for p in played]
    assert costs == [stage_cost(table, p) for p in played]
    assert sum(costs) >= budget > sum(costs[:-1])
    stops = {p.stop.split()[0] for p in played}
    assert "stage0" in stops, "the params limit stops some candidates before dispatch"
    if arm == "mo-asha":
        assert "rung" in stops, "mo-asha stops some trials at a rung, at that rung's cost"


def test_hypervolume_curve_is_monotone_and_seeded(table: Table) -> None:
    budget = 8 * table.full_cost()
    runs = replay.replay(table, ["mo-asha"], 2, budget, None)
    again = replay.replay(table, ["mo-asha"], 1, budget, None)
    reference = np.array(replay.pareto.default_reference(table.points()))
    spent, hv = replay.hv_steps(runs[("mo-asha", 0)], reference)
    assert np.all(np.diff(hv) >= 0) and np.all(np.diff(spent) >= 0) and hv[-1] > 0
    assert again[("mo-asha", 0)] == runs[("mo-asha", 0)]
    assert runs[("mo-asha", 1)] != runs[("mo-asha", 0)]


def test_replay_command_writes_its_report(table_files: tuple[Path, Path], tmp_path: Path
                                          ) -> None:
    code = replay.main(["--results", str(table_files[0]), "--plan", str(table_files[1]),
                        "--arms", "constraints", "mo-asha", "--seeds", "2",
                        "--budget-trials", "6", "--out-dir", str(tmp_path)])
    assert code == 0
    text = (tmp_path / "replay.md").read_text()
    assert "SYNTHETIC TABLE" in text and "| mo-asha | 2 |" in text
    doc = json.loads((tmp_path / "replay.json").read_text())
    assert np.all(np.diff(doc["arms"]["mo-asha"]["mean"]) >= 0)
    assert (tmp_path / "hv.png").stat().st_size > 0


def test_replay_names_a_corrupt_table(table_files: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "results.jsonl"
    bad.write_text(table_files[0].read_text().splitlines()[0] + "\n{not json\n")
    assert replay.main(["--results", str(bad), "--arms", "mo-asha"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2" in err


def test_record_imports_no_ray_optuna_or_search() -> None:
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import record; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FORBIDDEN)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_record_runs_a_real_trial_and_resumes(tmp_path: Path) -> None:
    doc = plan.plan(BENCH / "space.toml", 1, 0)
    entry = doc["configs"][0]
    entry["config"]["unet"].update(image_size=8, base_width=8, width_mults=[1], attn_levels=[],
                                   norm_groups=4)
    entry["config"]["schedule"].update(sampler="ddim", steps=2)
    entry["config"]["train"].update(steps=4, warmup_steps=1, eval_every=4)
    entry["rungs"] = [2, 4]
    doc.update(configs=[entry], data={**doc["data"], "image_size": 8},
               evaluate={**doc["evaluate"], "fid_samples": 8, "grid_images": 4})
    out = tmp_path / "results.jsonl"
    assert record.record(doc, out, jobs=1, limit=1) == 1
    row = json.loads(out.read_text())
    assert row["status"] == "completed", row["reason"]
    cpu = [row["cpu_s"]["start"], row["cpu_s"]["measured"],
           *(r["cpu_s"] for r in row["rungs"]), row["cpu_s"]["end"]]
    assert [r["step"] for r in row["rungs"]] == [2, 4] and cpu == sorted(cpu)
    assert set(row["values"]) == {"fid", "latency_ms", "peak_mem_mb"}
    assert set(row["constraints"]) == {"params", "latency_ms", "memory_mb"}
    assert record.record(doc, out, jobs=1, limit=None) == 0, "a recorded config is skipped"
