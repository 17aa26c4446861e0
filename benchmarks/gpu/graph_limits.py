#!/usr/bin/env python3
"""How many kernels MLX's CUDA backend puts in one CUDA graph, and what it costs a step.

MLX on CUDA records the kernels of an evaluation into CUDA graphs and launches a graph
once it holds ``MLX_MAX_OPS_PER_BUFFER`` kernels (100 on an H100/H200, 20 on most other
GPUs) or ``MLX_MAX_MB_PER_BUFFER`` MB; ``MLX_USE_CUDA_GRAPHS=0`` launches every kernel
by itself. Both are read once, when MLX starts, so each setting needs its own process:

  python3 benchmarks/gpu/graph_limits.py --settings default ops=400 ops=2000 graphs=0 \
      --passes 2 --json OUT.json

runs one fresh process per setting and pass (settings alternate within a pass) and prints,
per setting, the median eager train step of the demo U-Net at batch 32 and the median
DDIM-20 run at batch 1. ``--child`` is the measuring process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ENV = {"ops": "MLX_MAX_OPS_PER_BUFFER", "mb": "MLX_MAX_MB_PER_BUFFER",
       "graphs": "MLX_USE_CUDA_GRAPHS"}


def setting_env(setting: str) -> dict[str, str]:
    """``default``, or ``name=value`` pairs joined by ``,`` (``ops=400,mb=2000``)."""
    if setting == "default":
        return {}
    env = {}
    for part in setting.split(","):
        name, _, value = part.partition("=")
        if name not in ENV or not value.isdigit():
            raise SystemExit(f"graph_limits: bad setting {part!r} (use {', '.join(ENV)}=N)")
        env[ENV[name]] = value
    return env


def child(steps: int, runs: int) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import mlx.core as mx
    import numpy as np
    from throughput import CONFIGS

    import engine  # noqa: F401  (kernel cache and compile mode before mlx loads)
    from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
    from engine.model.unet import UNet
    from engine.sampling.samplers import generate
    from engine.training import train as etrain

    data = dict(CONFIGS["demo"])
    ucfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    cfg = Config(unet=ucfg, schedule=ScheduleConfig(sampler="ddim", steps=20),
                 train=TrainConfig(batch_size=32, steps=10**6))
    x0 = mx.array(np.random.default_rng(0).uniform(-1, 1, (32, ucfg.image_size,
                                                           ucfg.image_size, ucfg.channels))
                  .astype(np.float32))
    state = etrain.init_state(cfg)
    step = etrain.training_update(state)
    times = []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        loss = step(x0, mx.random.key(i + 1))
        mx.eval(loss, state.model.state, state.optimizer.state)
        times.append(time.perf_counter() - t0)
    model = UNet(ucfg)
    mx.eval(model.parameters())
    sample = []
    for _ in range(2 + runs):
        t0 = time.perf_counter()
        generate(model, cfg.schedule, 1, 0, ucfg.image_size, ucfg.channels)
        sample.append(time.perf_counter() - t0)
    return {"train_first_s": times[0], "train_step_ms": 1e3 * float(np.median(times[3:])),
            "ddim20_b1_ms": 1e3 * float(np.median(sample[2:])),
            "env": {v: os.environ.get(v) for v in ENV.values()},
            "device": str(mx.default_device()), "mlx": mx.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["default", "ops=400", "ops=2000",
                                                     "graphs=0"])
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed train steps per process")
    p.add_argument("--runs", type=int, default=10, help="timed DDIM-20 runs per process")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.runs)), flush=True)
        return
    rows = []
    for n in range(args.passes):
        for setting in args.settings if n % 2 == 0 else args.settings[::-1]:
            env = {k: v for k, v in os.environ.items() if k not in ENV.values()}
            run = subprocess.run([sys.executable, __file__, "--child", "--steps",
                                  str(args.steps), "--runs", str(args.runs)],
                                 env={**env, **setting_env(setting)}, capture_output=True,
                                 text=True, timeout=600, check=False)
            row = {"setting": setting, "pass": n, "rc": run.returncode}
            if run.returncode == 0:
                row |= json.loads(run.stdout.strip().splitlines()[-1])
            else:
                row["error"] = run.stderr.strip().splitlines()[-1:] or ["?"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print("\n| setting | train step b32 (ms) | DDIM-20 b1 (ms) |\n|---|---:|---:|")
    for setting in args.settings:
        ok = [r for r in rows if r["setting"] == setting and r["rc"] == 0]
        train = ", ".join(f"{r['train_step_ms']:.1f}" for r in ok) or "failed"
        ddim = ", ".join(f"{r['ddim20_b1_ms']:.1f}" for r in ok) or "failed"
        print(f"| {setting} | {train} | {ddim} |")


if __name__ == "__main__":
    main()
