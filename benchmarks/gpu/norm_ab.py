"""Paired A/B in one process on the default device: ``engine.model.norm`` against an
older ``norm.py`` (the demo's DDIM-20 at batch 1 and 16, 5 train steps at b32; a fresh
model per round, rounds alternating, best of 3 calls a round).

    git show 34fa85b~1:engine/model/norm.py > /tmp/norm_old.py
    python benchmarks/gpu/norm_ab.py /tmp/norm_old.py 6 sample1 sample16 train

Writes ``$OUT/norm_ab.json`` (default: the current folder).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import engine  # noqa: F401  (binds the BLAS before MLX loads)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn

from engine.config import Config
from engine.model import norm
from engine.model.unet import UNet
from engine.sampling.samplers import generate


def _old_norm(path: str) -> Callable[..., Callable[..., mx.array]]:
    spec = importlib.util.spec_from_file_location("engine.model.norm_old", path)
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    return lambda groups, eps, *_: old._group_norm(groups, eps)  # type: ignore[no-any-return]


def _job(cfg: Config, base: UNet, mode: str) -> Callable[[], None]:
    u = cfg.unet
    m = UNet(u)
    m.update(base.parameters())
    mx.eval(m.parameters())
    if mode.startswith("sample"):
        sched = dataclasses.replace(cfg.schedule, sampler="ddim", steps=20, eta=0.0, guidance=1.0)
        b = int(mode.removeprefix("sample"))
        return lambda: mx.eval(generate(m, sched, b, 0, u.image_size, u.channels))
    opt = optim.Adam(1e-4)
    x = mx.random.normal((32, u.image_size, u.image_size, u.channels), key=mx.random.key(3))
    t = mx.random.uniform(shape=(32,), key=mx.random.key(4))
    args = (x, t, mx.zeros((32,), mx.int32)) if u.num_classes else (x, t)
    value_and_grad = nn.value_and_grad(m, lambda mm: ((mm(*args) - x) ** 2).mean())

    def steps() -> None:
        for _ in range(5):
            loss, grads = value_and_grad(m)
            opt.update(m, grads)
            mx.eval(loss, m.parameters(), opt.state)

    return steps


def main() -> None:
    old_path, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    print("device", mx.default_device(), "mlx", mx.__version__, flush=True)
    cfg = Config.from_json((ROOT / "engine/configs/demo.json").read_text())
    base = UNet(cfg.unet)
    mx.eval(base.parameters())
    variants = {"old": _old_norm(old_path), "new": norm._group_norm}
    out: dict[str, dict[str, list[float]]] = {}
    for mode in modes:
        res: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(rounds):
            for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                norm._group_norm = variants[name]  # type: ignore[assignment]
                job = _job(cfg, base, mode)
                job()
                job()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    job()
                    times.append((time.perf_counter() - start) * 1e3)
                res[name].append(min(times))
        o, n = np.array(res["old"]), np.array(res["new"])
        out[mode] = res
        print(f"{mode} old median {np.median(o):.1f} new median {np.median(n):.1f}  paired "
              f"old/new {np.median(o / n):.3f} ({(o / n).min():.3f}-{(o / n).max():.3f})",
              flush=True)
    (Path(os.environ.get("OUT", ".")) / "norm_ab.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
