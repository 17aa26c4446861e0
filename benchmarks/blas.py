#!/usr/bin/env python3
"""The three BLAS MLX's CPU backend can run on Linux, side by side in one run: a 1024^2 fp32
matmul (GFLOP/s) and one training step of the demo config (ms).

  uv run python benchmarks/blas.py [--rounds 3] [--json results/blas.json]

Each variant runs in its own interpreter (a process binds its BLAS once, before mlx loads):
``reference`` (``DIFFNAS_BLAS=reference``: netlib, bundled with the mlx wheel), the lock
file's ``cmeel-openblas`` and Debian's ``libopenblas0-pthread`` (``DIFFNAS_BLAS=<path>``).
The variants take turns, ``--rounds`` times, so that a change of machine load falls on all
of them; each figure is the median over rounds of a per-round median, and the load average
is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.device import blas

WORKER = """
import json, os, time
import engine
from engine.config import Config
from engine.device import blas
from engine.device.bench import train_throughput
import mlx.core as mx
a = mx.random.normal((1024, 1024), key=mx.random.key(0))
mx.eval(a @ a)
times = []
for _ in range(7):
    start = time.perf_counter()
    mx.eval(a @ a)
    times.append(time.perf_counter() - start)
config = Config.load("engine/configs/demo.json")
step_ms = config.train.batch_size / train_throughput(config, steps=3, warmup=1) * 1e3
print(json.dumps({"blas": blas.BLAS_NAME, "gflops": 2 * 1024**3 / sorted(times)[3] / 1e9,
                  "step_ms": step_ms, "load": os.getloadavg()[0]}))
"""


def variants() -> dict[str, str]:
    """Name -> ``DIFFNAS_BLAS`` of each variant found on this machine."""
    found = {"reference": "reference"}
    for path in blas.candidates():
        found.setdefault("cmeel-openblas" if "cmeel.prefix" in path else "debian-openblas", path)
    return found


def run(env_blas: str) -> dict:
    env = {**os.environ, "DIFFNAS_BLAS": env_blas, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    found = variants()
    runs: dict[str, list[dict]] = {name: [] for name in found}
    for r in range(args.rounds):
        for name, env_blas in found.items():
            runs[name].append(run(env_blas))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    print("\n| BLAS | matmul 1024^2 fp32 GFLOP/s | demo train step ms | load average (1 min) |")
    print("|---|---:|---:|---|")
    for name, rows in runs.items():
        loads = [row["load"] for row in rows]
        print(f"| {name} | {np.median([r['gflops'] for r in rows]):.1f} | "
              f"{np.median([r['step_ms'] for r in rows]):.0f} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")
    print("\n" + "\n".join(f"- {name}: {rows[0]['blas']}" for name, rows in runs.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "time": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
