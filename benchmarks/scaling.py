"""Trials per hour with 1 vs 2 workers on a simulated 2-node cluster, and coordinator overhead.

    uv run python benchmarks/scaling.py [--trials 8] [--space smoke]

Two Ray nodes of one CPU and one ``diffnas_device`` each (``ray.cluster_utils.Cluster``);
the same study runs with 1 and then 2 workers. Efficiency = trials/h with 2 workers
divided by twice the trials/h with 1. Overhead = ask + dispatch + tell + artifact write
per trial, as a share of the trial's duration. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

import engine  # noqa: F401  (binds OpenBLAS before mlx loads)
from engine.device.bench import device_fingerprint
from search.run.runner import SearchOptions, run_search
from workers import RESOURCE


def run(workers: int, space: str, trials: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp())
    try:
        r = run_search(SearchOptions(space=space, study=f"scale{workers}", results=tmp,
                                     trials=trials, workers=workers))
    finally:
        shutil.rmtree(tmp)
    assert r.complete == trials, r
    over, dur = np.array(r.overhead_s), np.array(r.durations_s)
    return {"wall_s": r.wall_s, "trials_per_hour": 3600 * trials / r.wall_s,
            "overhead_ms_mean": 1e3 * over.mean(), "trial_s_mean": dur.mean(),
            "overhead_pct": 100 * (over / dur).mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--space", default="smoke")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {RESOURCE: 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        rows: dict[str, object] = {str(w): run(w, args.space, args.trials) for w in (1, 2)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    one, two = rows["1"], rows["2"]
    assert isinstance(one, dict) and isinstance(two, dict)
    rows["efficiency"] = two["trials_per_hour"] / (2 * one["trials_per_hour"])
    rows["device"] = device_fingerprint()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
