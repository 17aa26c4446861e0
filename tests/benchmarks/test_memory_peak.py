"""benchmarks/gpu/memory_peak.py runs on the CPU too: each mode writes one JSON row per
measurement, with a peak the step allocated and the MLX settings that move it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rows(*args: str, **env: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/memory_peak.py"), *args],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, **env}).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_steps_report_a_peak_that_grows_with_the_batch_and_the_settings_used():
    rows = _rows("mlx", "--batch", "2", "8", "--rounds", "1", "--steps", "1",
                 MLX_MAX_MB_PER_BUFFER="50")
    assert [r["batch"] for r in rows] == [2, 8]
    assert 0 < rows[0]["peak_mib"] < rows[1]["peak_mib"]  # activations scale with the batch
    assert all(r["MLX_MAX_MB_PER_BUFFER"] == "50" and r["ms_median"] > 0 for r in rows)


def test_sampling_and_layers_modes():
    sampling = _rows("mlx", "--sampling", "--batch", "1", "--rounds", "1", "--steps", "1")
    assert [(r["piece"], r["batch"]) for r in sampling] == [("ddim20", 1)]
    layers = _rows("mlx", "--layers", "--batch", "2")
    assert {r["piece"] for r in layers} >= {"conv16", "groupnorm", "attention",
                                            "large-attention16"}
    assert all(r["peak_mib"] > 0 for r in layers)
