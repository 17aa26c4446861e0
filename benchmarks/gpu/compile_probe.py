#!/usr/bin/env python3
"""MLX's start-up cost in one fresh process: the first train step and the first DDIM run,
with the kernel cache that ``engine.device.kernel_cache`` chose and the engine's compile
mode (``DIFFNAS_COMPILE=on|fused|off``, ``engine.device.compile_mode``; on a CUDA GPU the
default is ``off``: set ``on`` to time the compiled step).

``--stages`` first times the device's first evaluation, the loss's first forward pass and
its first gradient on their own, each with the names of the modules it had NVRTC build, so
that a cold start's cost can be traced to the ops that pay it.

Run it twice with the same cache folder: the first run on an empty folder measures a cold
start (every kernel compiled by NVRTC), the second a warm one (kernels read from disk), as
a worker's second trial, or a later study, starts. Prints a JSON line after each stage (the last
is complete, the earlier ones survive a time limit):

  DIFFNAS_COMPILE=on python3 benchmarks/gpu/compile_probe.py --config demo --batch 32 --label cold
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import engine  # noqa: F401  (BLAS binding and kernel cache before mlx loads)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from throughput import CONFIGS, LARGE

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.device import compile_mode, kernel_cache
from engine.model.unet import UNet
from engine.sampling.samplers import generate
from engine.training import train as etrain
from engine.training.objective import base_loss, loss_and_grad


def _modules() -> set[str]:
    return kernel_cache.modules() or set()


def _stage(run: Callable[[], None]) -> tuple[float, list[str]]:
    """Seconds ``run`` took, and the names of the modules it built."""
    before, t0 = _modules(), time.perf_counter()
    run()
    return time.perf_counter() - t0, sorted(_modules() - before)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo", choices=[*CONFIGS, *LARGE])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--sample-batch", type=int, default=1, help="0: no sampling")
    p.add_argument("--label", default="", help="a name for this run in the output")
    p.add_argument("--optimizer", default="engine", choices=("engine", "mlx"),
                   help="engine: train.make_optimizer (fused per array where the step is not "
                        "compiled whole); mlx: mlx.optimizers.AdamW(bias_correction=True)")
    p.add_argument("--stages", action="store_true",
                   help="time the first evaluation, forward and gradient apart, with the "
                        "modules each built")
    p.add_argument("--steady-steps", type=int, default=2,
                   help="train calls timed after the first (their median is the steady cost)")
    args = p.parse_args(argv)
    start_process = time.perf_counter()
    data = {**({**CONFIGS, **LARGE}[args.config])}
    ucfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    cfg = Config(unet=ucfg, schedule=ScheduleConfig(sampler="ddim", steps=20),
                 train=TrainConfig(batch_size=args.batch, steps=10**6, dtype=args.dtype))
    before = kernel_cache.describe().get("kernel_cache_modules")
    out = {"label": args.label, "config": args.config, "batch": args.batch,
           "dtype": args.dtype, "optimizer": args.optimizer,
           "compile_mode": compile_mode.STATUS["compile"], "device": str(mx.default_device()), "mlx": mx.__version__,
           **kernel_cache.describe()}
    shape = (args.batch, ucfg.image_size, ucfg.image_size, ucfg.channels)
    x0 = mx.array(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
    print(json.dumps(out), flush=True)
    state = etrain.init_state(cfg)
    if args.optimizer == "mlx":
        state.optimizer = optim.AdamW(learning_rate=etrain.learning_rate_schedule(cfg.train),
                                      weight_decay=cfg.train.weight_decay, bias_correction=True)
        state.optimizer.init(state.model.trainable_parameters())
    out["optimizer_class"] = type(state.optimizer).__name__
    if args.stages:
        loss_fn, key = base_loss(cfg), mx.random.key(0)
        grad = loss_and_grad(state.model, loss_fn, args.dtype)
        for name, run in (("init", lambda: mx.eval(mx.ones(4) + 1)),
                          ("forward", lambda: mx.eval(loss_fn(state.model, x0, key))),
                          ("gradient", lambda: mx.eval(grad(x0, key)))):
            out[f"{name}_first_s"], out[f"{name}_modules"] = _stage(run)
        print(json.dumps(out), flush=True)
    built = _modules()
    step = etrain.training_update(state)
    times = []
    for i in range(1 + args.steady_steps):  # the first call compiles; the rest are steady
        t0 = time.perf_counter()
        loss = step(x0, mx.random.key(i + 1))
        mx.eval(loss, state.model.state, state.optimizer.state)
        times.append(time.perf_counter() - t0)
    out["train_first_call_s"], out["train_next_calls_s"] = times[0], times[1:4]
    out["train_steady_median_s"] = float(np.median(times[1:]))
    out["modules_after_train"] = kernel_cache.describe().get("kernel_cache_modules")
    out["train_step_modules"] = sorted(_modules() - built)
    print(json.dumps(out), flush=True)  # kept if the sampling part runs past a time limit
    built = _modules()
    if args.sample_batch:
        model = UNet(ucfg)
        mx.eval(model.parameters())
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            generate(model, cfg.schedule, args.sample_batch, 0, ucfg.image_size, ucfg.channels)
            times.append(time.perf_counter() - t0)
        out["sample_first_call_s"], out["sample_second_call_s"] = times
        out["sample_modules"] = sorted(_modules() - built)
    out["peak_mib"] = round(mx.get_peak_memory() / 2**20, 1)
    out["modules_before"] = before
    out["modules_after"] = kernel_cache.describe().get("kernel_cache_modules")
    out["process_s"] = time.perf_counter() - start_process
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
