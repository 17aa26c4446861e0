"""The engine's eager train step with each optimizer, side by side in one process.

The demo config's update (``engine.training.train.compiled_update``, which runs eagerly
where whole graphs are not compiled) and EMA, at its batch size, with MLX's AdamW, the
per-array fused kernels (:class:`engine.training.fused.FusedAdamW`) and the joined update
(:class:`engine.training.fused.FlatAdamW`), the last with the EMA per array (the
engine's) and, to try, joined as the optimizer joins its arrays. Rounds alternate the
order; each round builds a fresh model and optimizer, warms up 3 steps and times 10.

    DIFFNAS_COMPILE=off python benchmarks/gpu/optimizer_step.py --rounds 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
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
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.config import Config
from engine.device import compile_mode
from engine.training import train
from engine.training.fused import FlatAdamW, FusedAdamW, cut, ema_update, join
from engine.training.objective import base_loss


def _per_array_ema(ema: dict, params: dict, d: float) -> dict:
    return tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)  # type: ignore[no-any-return]


def _joined_ema(ema: dict, params: dict, d: float) -> dict:
    names, leaves = zip(*tree_flatten(ema))
    now = dict(tree_flatten(params))
    joined = d * join(leaves) + (1 - d) * join([now[n] for n in names])
    return tree_unflatten(list(zip(names, cut(joined, [a.shape for a in leaves]))))  # type: ignore[no-any-return]


VARIANTS: dict[str, tuple[Callable[[train.TrainConfig], optim.Optimizer], Callable]] = {
    "mlx": (lambda c: optim.AdamW(learning_rate=train.learning_rate_schedule(c),
                                  weight_decay=c.weight_decay, bias_correction=True),
            _per_array_ema),
    "fused": (lambda c: FusedAdamW(train.learning_rate_schedule(c),
                                   weight_decay=c.weight_decay), ema_update),
    "flat": (lambda c: FlatAdamW(train.learning_rate_schedule(c),
                                 weight_decay=c.weight_decay), _per_array_ema),
    "flat+ema": (lambda c: FlatAdamW(train.learning_rate_schedule(c),
                                     weight_decay=c.weight_decay), _joined_ema),
}


def _step(cfg: Config, name: str, images: np.ndarray) -> Callable[[int], None]:
    state = train.init_state(cfg)
    make, ema = VARIANTS[name]
    state.optimizer = make(cfg.train)
    state.optimizer.init(state.model.trainable_parameters())
    update = train.compiled_update(state.model, state.optimizer, base_loss(cfg),
                                   cfg.train.grad_clip, cfg.train.dtype)
    labels = np.zeros(len(images), np.int64) if cfg.unet.num_classes else None

    def step(n: int) -> None:
        loss = train.take_step(update, images, cfg.train.seed, n, cfg.train.batch_size,
                               labels=labels)
        state.ema = ema(state.ema, state.model.parameters(), 0.999)
        mx.eval(loss, state.ema, state.model.state, state.optimizer.state)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cfg = Config.from_json((ROOT / "engine/configs" / f"{args.config}.json").read_text())
    rng = np.random.default_rng(0)
    size, ch = cfg.unet.image_size, cfg.unet.channels
    images = rng.uniform(-1, 1, (256, size, size, ch)).astype(np.float32)
    print(f"device {mx.default_device()}, mlx {mx.__version__}, compile "
          f"{compile_mode.STATUS['compile']}, batch {cfg.train.batch_size}", flush=True)
    res: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name in list(VARIANTS)[:: 1 if r % 2 == 0 else -1]:
            step = _step(cfg, name, images)
            for n in range(3):
                step(n)
            times = []
            for n in range(3, 13):
                start = time.perf_counter()
                step(n)
                times.append((time.perf_counter() - start) * 1e3)
            res[name].append(float(np.median(times)))
        print(r, {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
    med = {k: float(np.median(v)) for k, v in res.items()}
    print("median ms a step:", {k: round(v, 1) for k, v in med.items()},
          f"flat+ema/mlx {med['flat+ema'] / med['mlx']:.3f}, flat/mlx {med['flat'] / med['mlx']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(mx.default_device()),
                                         "compile": compile_mode.STATUS["compile"],
                                         "rounds": res, "median_ms": med}, indent=1))


if __name__ == "__main__":
    main()
