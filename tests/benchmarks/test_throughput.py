"""benchmarks/throughput.py's best-vs-best harness on this CPU, with tiny settings: variant
names, the CPU paths (CUDA graphs skip with a reason), the tables, and a worker stopped
by its time limit keeping what it measured. Torch runs only where the side venv exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "gpu")]

import best
import torch_variants as tv

TORCH = Path("/tmp/torchenv-cpu/bin/python")
TINY = ["--config", "small", "--batch", "2", "--sample-batches", "1", "--sample-steps", "2",
        "--windows", "5", "--min-window-s", "0", "--train-warmup", "1"]


def test_variant_names():
    v = tv.parse("cudagraph+bf16+channels_last")
    assert (v.base, v.bf16, v.channels_last, v.tuned) == ("cudagraph", True, True, True)
    assert tv.parse("bf16").base == "fused" and not tv.parse("eager").tuned
    for bad in ("cudagraf", "compile+cudagraph", ""):
        with pytest.raises(ValueError, match="torch variant"):
            tv.parse(bad)


def test_bad_variant_is_one_line_error():
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--compare",
                           "--torch-variants", "eager,cudagraf"], check=False,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "'cudagraf'" in proc.stderr.strip().splitlines()[-1]


def test_best_picks_the_fastest_and_shares_of_peak():
    rows = {"a": {"images_per_s": 10.0, "median_s": 0.2, "spread": 0.0},
            "b": {"images_per_s": 30.0, "median_s": 0.1, "spread": 0.0}, "c": {"skipped": "x"}}
    assert best.best("train_b2", rows)[0] == "b"
    assert best.best("sample_b1", {"a": {"ms": 5.0}, "b": {"ms": 3.0}})[0] == "b"
    # 3 x 2 images x 1 GFLOP in 0.1 s = 60 GFLOP/s
    assert best.tflops("train_b2", rows["b"], 1.0, 20) == pytest.approx(0.06)


@pytest.mark.skipif(not TORCH.exists(), reason="needs the torch side venv")
def test_cpu_compare_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--compare", *TINY,
                           "--mlx-python", f"{sys.executable}", "--torch-python", str(TORCH),
                           "--threads", "1", "--mlx-blas", "openblas", "--skip-equivalence",
                           "--mlx-variants", "compiled", "--torch-variants", "eager,cudagraph",
                           "--peak-tflops", "1", "--json-out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    torch_rows = runs["torch 1T"]["configs"]["small"]["rows"]
    assert torch_rows["train_b2"]["cudagraph"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert torch_rows["train_b2"]["eager"]["images_per_s"] > 0
    mlx = runs["mlx openblas 1T"]["configs"]["small"]["rows"]
    assert mlx["train_b2"]["compiled"]["first_call_s"] > 0 and mlx["train_b2"]["compiled"]["peak_mib"] > 0
    assert "| train img/s, b2 | mlx openblas 1T |" in proc.stdout
    assert (tmp_path / "r.partial.torch-1T.jsonl").read_text().count("\n") == 4  # 2 variants x 2 rows


def test_stopped_worker_keeps_its_measurements(tmp_path):
    sys.path.insert(0, str(BENCH))
    import throughput

    part = tmp_path / "p.jsonl"
    part.write_text(json.dumps({"config": "small", "info": {"params_cost": 5}}) + "\n"
                    + json.dumps({"framework": "mlx", "config": "small", "row": "sample_b1",
                                  "variant": "engine", "ms": 3.0}) + "\n")
    res = throughput._salvage(part, "mlx", {"backend": "cpu"})
    assert res["timed_out"] and res["configs"]["small"]["params_cost"] == 5
    assert res["configs"]["small"]["rows"]["sample_b1"]["engine"] == {"ms": 3.0}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_one_thread_run_is_confined_to_one_core_with_its_threads():
    # MLX computes on a thread of its own: "1 thread" must not mean a second core.
    import throughput

    probe = ("import json, os, threading\n"
             "seen = []\n"
             "t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))\n"
             "t.start(); t.join()\n"
             f"print({throughput.MARK!r} + json.dumps([sorted(os.sched_getaffinity(0)), seen[0]]))")
    one = throughput._cores(1)
    assert one is not None and len(one) == 1
    assert throughput._run([sys.executable, "-c", probe], cores=one) == [sorted(one)] * 2
    everywhere = sorted(os.sched_getaffinity(0))
    assert throughput._run([sys.executable, "-c", probe]) == [everywhere] * 2
