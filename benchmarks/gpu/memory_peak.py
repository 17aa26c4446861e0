"""Where a training step's peak memory goes on an MLX GPU, beside torch.

Issue 16, part 3 asks for MLX's peak within 1.5x of torch's. A peak here is the memory a
piece allocates above what was alive before it (its inputs and weights).

``mlx``: the engine's eager training step (``benchmarks/throughput.py``'s
``_mlx_eager_step``: loss, clip, optimizer) on ``--config`` (throughput.py's names): its
peak and its time (median of ``--steps``, ``--rounds`` times), with the MLX settings that
move a peak in each row (``MLX_MAX_MB_PER_BUFFER``, ``MLX_MAX_OPS_PER_BUFFER``: how much a
CUDA graph of MLX's holds before it is launched, its buffers alive until it completes;
``MLX_BFS_MAX_WIDTH``: the order MLX evaluates a graph in). MLX reads them once a process,
so an A/B is processes alternating (``memory.sh``).
``--sampling`` times the engine's DDIM-20 instead. ``--layers`` measures single layers, at the demo's shapes (3x3 convs at 16x16x32
and 8x8x64, a GroupNorm, ReLU, SiLU, the attention block at 8x8x64) and the large model's
(a 3x3 conv at 32x32x128, attention at 16x16x256), with a fixed random cotangent;
``torch`` measures the same layers in torch.

    python benchmarks/gpu/memory_peak.py mlx --config demo large --batch 256
    MLX_MAX_MB_PER_BUFFER=1000 python benchmarks/gpu/memory_peak.py mlx --batch 256
    python benchmarks/gpu/memory_peak.py mlx --sampling --config demo large --batch 1 16
    python benchmarks/gpu/memory_peak.py mlx --layers --batch 256
    python benchmarks/gpu/memory_peak.py torch --batch 256

One JSON object a row on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MIB = 2**20
LAYERS = {  # name: (kind, input shape without the batch); the demo's shapes, then large's
    "conv16": ("conv", (16, 16, 32)), "conv8": ("conv", (8, 8, 64)),
    "groupnorm": ("groupnorm", (16, 16, 32)), "relu": ("relu", (16, 16, 32)),
    "silu": ("silu", (16, 16, 32)), "attention": ("attention", (8, 8, 64)),
    "large-conv32": ("conv", (32, 32, 128)), "large-attention16": ("attention", (16, 16, 256)),
}
HEAD_DIM = 32


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _mlx() -> Any:
    import engine  # noqa: F401  (binds the BLAS before MLX loads)

    # isort: split
    import mlx.core as mx

    return mx


def _mlx_env() -> dict[str, str]:
    """The MLX settings that move a peak: its evaluation order and how much a CUDA graph
    may hold before it is launched (the buffers of its ops live until it completes)."""
    return {k: os.environ.get(k, "default") for k in
            ("MLX_BFS_MAX_WIDTH", "MLX_MAX_MB_PER_BUFFER", "MLX_MAX_OPS_PER_BUFFER")}


def _mlx_row(**fields: Any) -> dict[str, Any]:
    """A row of the MLX side: the device and the settings that move a peak, then ``fields``."""
    mx = _mlx()
    return {"framework": "mlx", "device": str(mx.default_device()), **_mlx_env(), **fields}


def _timed(run: Callable[[], Any], rounds: int, steps: int) -> dict[str, Any]:
    """``run`` (which evaluates its result) ``steps`` times a round: the median ms a call."""
    import numpy as np

    mx = _mlx()
    times = []
    for _ in range(rounds):
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        mx.synchronize()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return {"ms_median": round(float(np.median(times)), 2),
            "ms_rounds": [round(t, 2) for t in times]}


def _unet(data: dict[str, Any]) -> Any:
    """A throughput.py config as the engine's validated ``UNetConfig``."""
    from engine.config import Config

    return Config.from_dict({"unet": data}).unet


def _mlx_peak(run: Callable[[], Any]) -> float:
    """MiB that ``run`` allocates at its peak above what was alive before it (warmed first)."""
    mx = _mlx()
    mx.eval(run())  # warm: kernels built, buffers cached
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = run()
    mx.eval(out)
    mx.synchronize()
    del out
    return (mx.get_peak_memory() - base) / MIB


def mlx_steps(configs: list[str], batches: list[int], rounds: int, steps: int) -> None:
    """The engine's eager step: its peak and its median time."""
    mx = _mlx()
    from benchmarks.throughput import _load_configs, _mlx_eager_step
    from engine.config import Config, ScheduleConfig, TrainConfig
    from engine.model.formulation import cpu_layers
    from engine.training import train as etrain

    for name, data in _load_configs(configs).items():
        ucfg = _unet(data)
        for b in batches:
            cfg = Config(unet=ucfg, schedule=ScheduleConfig(sampler="ddim", steps=20),
                         train=TrainConfig(batch_size=b, steps=10**6))
            state = etrain.init_state(cfg)
            step = _mlx_eager_step(state)
            x0 = mx.random.normal((b, ucfg.image_size, ucfg.image_size, ucfg.channels),
                                  key=mx.random.key(0))
            mx.eval(x0)

            def one(step: Callable = step, x0: Any = x0, state: Any = state) -> Any:
                loss = step(x0, mx.random.key(1))
                return loss, state.model.parameters(), state.optimizer.state

            peak = _mlx_peak(one)
            _emit(_mlx_row(layers="cpu" if cpu_layers() else "mlx", config=name, piece="step",
                           batch=b, peak_mib=round(peak, 1),
                           **_timed(lambda one=one: mx.eval(one()), rounds, steps)))


def mlx_sampling(configs: list[str], batches: list[int], rounds: int, steps: int) -> None:
    """The engine's DDIM-20 (``generate``) at each batch: median time of ``steps`` runs,
    ``rounds`` times, with the graph cap in the row (a cap can move where MLX cuts its CUDA
    graphs, and so the latency objective)."""
    mx = _mlx()
    from benchmarks.throughput import _load_configs
    from engine.config import ScheduleConfig
    from engine.model.unet import UNet
    from engine.sampling.samplers import generate

    for name, data in _load_configs(configs).items():
        ucfg = _unet(data)
        model = UNet(ucfg)
        mx.eval(model.parameters())
        sched = ScheduleConfig(sampler="ddim", steps=20)
        for b in batches:
            def run(b: int = b, model: Any = model, sched: Any = sched, u: Any = ucfg) -> None:
                generate(model, sched, b, 0, u.image_size, u.channels)  # ends with mx.eval

            run()
            _emit(_mlx_row(config=name, piece="ddim20", batch=b, **_timed(run, rounds, steps)))


def mlx_layers(batches: list[int]) -> None:
    """Single layers (:data:`LAYERS`): the peak of their input and weight gradients."""
    mx = _mlx()
    from mlx import nn

    from engine.config import UNetConfig
    from engine.model.conv import Conv2d
    from engine.model.formulation import cpu_layers
    from engine.model.norm import GroupNorm
    from engine.model.unet import Attention

    ucfg = UNetConfig(head_dim=HEAD_DIM)
    for b in batches:
        for name, (kind, shape) in LAYERS.items():
            c = shape[-1]
            layer: Any = (Conv2d(c, c, 3, padding=1) if kind == "conv" else
                          GroupNorm(8, c) if kind == "groupnorm" else
                          Attention(ucfg, c) if kind == "attention" else
                          nn.ReLU() if kind == "relu" else nn.SiLU())
            x = mx.random.normal((b, *shape), key=mx.random.key(2))
            cot = mx.random.normal(layer(x).shape, key=mx.random.key(3))
            mx.eval(x, cot, layer.parameters())
            weights = layer.trainable_parameters()

            def value(params: Any, xx: Any, layer: Any = layer, cot: Any = cot
                      ) -> Any:
                layer.update(params)
                return (layer(xx) * cot).sum()

            g = mx.grad(value, argnums=(0, 1) if weights else 1)
            _emit(_mlx_row(layers="cpu" if cpu_layers() else "mlx", piece=name, batch=b,
                           peak_mib=round(_mlx_peak(lambda g=g, w=weights, x=x: g(w, x)), 1),
                           activation_mib=round(x.nbytes / MIB, 1)))


def torch_rows(batches: list[int]) -> None:
    import torch

    from benchmarks.torch_unet import Attention, UNetCfg

    dev = torch.device("cuda")
    common = {"framework": "torch", "device": torch.cuda.get_device_name(dev),
              "torch": torch.__version__}
    torch.backends.cudnn.benchmark = True

    def peak(layer: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor) -> float:
        def run() -> None:
            xx = x.detach().requires_grad_(True)
            (layer(xx) * cot).sum().backward()
            layer.zero_grad(set_to_none=True)

        run()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / MIB

    for b in batches:
        for name, (kind, (h, w, c)) in LAYERS.items():
            layer = (torch.nn.Conv2d(c, c, 3, padding=1) if kind == "conv" else
                     torch.nn.GroupNorm(8, c) if kind == "groupnorm" else
                     Attention(UNetCfg(head_dim=HEAD_DIM), c) if kind == "attention" else
                     torch.nn.ReLU() if kind == "relu" else torch.nn.SiLU()).to(dev)
            x = torch.randn(b, c, h, w, device=dev)
            cot = torch.randn_like(layer(x))
            _emit({**common, "piece": name, "batch": b, "peak_mib": round(peak(layer, x, cot), 1),
                   "activation_mib": round(x.numel() * 4 / MIB, 1)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("side", choices=("mlx", "torch"))
    p.add_argument("--config", nargs="+", default=["demo"])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", action="store_true", help="single layers instead of steps")
    p.add_argument("--sampling", action="store_true", help="DDIM-20 times instead of steps")
    args = p.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.side == "torch":
        torch_rows(args.batch)
    elif args.layers:
        mlx_layers(args.batch)
    elif args.sampling:
        mlx_sampling(args.config, args.batch, args.rounds, args.steps)
    else:
        mlx_steps(args.config, args.batch, args.rounds, args.steps)


if __name__ == "__main__":
    main()
