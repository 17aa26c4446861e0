"""Which training recipe draws legible digits soonest? (issue 16, part 5)

The `demo` preset must finish in 10 minutes on a 2-core CPU and still draw digits: its
training budget is a few hundred steps a trial. This script trains each recipe (overrides
of the demo's centre config) with `engine.training.train` on the built-in digits, draws
samples from the EMA weights with several sampler settings and scores their legibility
(`engine.quality.legibility`: confident >= 0.9 and inside the class's typical set).

Recipes run in parallel, one process per listed core, pinned, one BLAS thread; each result
is a JSON line written as soon as the recipe ends (a cut-off run keeps what finished).
Engine only: no Ray, no Optuna, so it runs on any machine with MLX.

    python3 benchmarks/demo_recipe.py --cores 4-15 --out results/recipes.jsonl
    python3 benchmarks/demo_recipe.py --only cos-ema995 --cores 0      # one recipe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE: dict[str, dict[str, Any]] = {
    "unet": {"image_size": 16, "base_width": 32, "width_mults": [1, 2], "num_res_blocks": 1,
             "attn_levels": [1], "head_dim": 16, "norm_groups": 8, "activation": "silu",
             "time_emb_dim": 64},
    "schedule": {"beta_schedule": "cosine", "prediction": "v", "sampler": "dpmpp_2m",
                 "steps": 12, "spacing": "trailing"},
    "train": {"steps": 840, "batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 50,
              "ema_decay": 0.999, "eval_every": 10_000},
}
"""The demo space's centre; 840 steps at batch 32 is one 500 s trial a worker on the VM."""

COS = {"lr_decay": "cosine"}
SNR = {"loss_weight": "min_snr"}
COND = {"num_classes": 10}
L3 = {"width_mults": [1, 2, 2]}
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "const-ema999": {},
    "cos-ema999": {"train": COS},
    "cos-ema995": {"train": {**COS, "ema_decay": 0.995}},
    "cos-ema99-lr3e-3": {"train": {**COS, "ema_decay": 0.99, "learning_rate": 3e-3}},
    "cos-ema995-lr4e-3": {"train": {**COS, "ema_decay": 0.995, "learning_rate": 4e-3}},
    "cos-ema995-noattn": {"unet": {"attn_levels": []}, "train": {**COS, "ema_decay": 0.995}},
    "cos-ema995-b16x1680": {"train": {**COS, "ema_decay": 0.995, "batch_size": 16,
                                      "steps": 1680}},
    "cos-ema995-w24": {"unet": {"base_width": 24}, "train": {**COS, "ema_decay": 0.995}},
    "cos-ema995-420": {"train": {**COS, "ema_decay": 0.995, "steps": 420}},
    "cos-ema995-1680": {"train": {**COS, "ema_decay": 0.995, "steps": 1680}},
    "cos-ema995-122": {"unet": {"width_mults": [1, 2, 2]}, "train": {**COS, "ema_decay": 0.995}},
    "const-ema995": {"train": {"ema_decay": 0.995}},
    # round 2: the three-level U-Net (the best of round 1) and min-SNR-5 loss weighting
    "122-cos-minsnr": {"unet": L3, "train": {**COS, **SNR}},
    "122-cos-minsnr-lr3e-3": {"unet": L3, "train": {**COS, **SNR, "learning_rate": 3e-3}},
    "122-cos-minsnr-lr1.5e-3": {"unet": L3, "train": {**COS, **SNR, "learning_rate": 1.5e-3}},
    "122-const-minsnr": {"unet": L3, "train": SNR},
    "122-noattn-cos-minsnr": {"unet": {**L3, "attn_levels": []}, "train": {**COS, **SNR}},
    "1222-cos-minsnr": {"unet": {"width_mults": [1, 2, 2, 2]}, "train": {**COS, **SNR}},
    "122-cos-minsnr-b16x1680": {"unet": L3, "train": {**COS, **SNR, "batch_size": 16,
                                                       "steps": 1680}},
    "12-cos-minsnr": {"train": {**COS, **SNR}},
    "122-cos-minsnr-seed1": {"unet": L3, "train": {**COS, **SNR, "seed": 1}},  # seed noise
    "122-cos-seed1": {"unet": L3, "train": {**COS, "ema_decay": 0.995, "seed": 1}},
    # round 3: class-conditional networks sampled with classifier-free guidance
    "122-cos-800": {"unet": L3, "train": {**COS, "steps": 800}},
    "cond-122-cos-800": {"unet": {**L3, **COND}, "train": {**COS, "steps": 800}},
    "cond-122-cos-800-seed1": {"unet": {**L3, **COND}, "train": {**COS, "steps": 800,
                                                                   "seed": 1}},
    "cond-122-cos-800-p20": {"unet": {**L3, **COND}, "train": {**COS, "steps": 800,
                                                                 "label_dropout": 0.2}},
    "cond-122-noattn-cos-800": {"unet": {**L3, **COND, "attn_levels": []},
                                "train": {**COS, "steps": 800}},
    "cond-122-cos-400": {"unet": {**L3, **COND}, "train": {**COS, "steps": 400}},
    "cond-12-cos-800": {"unet": COND, "train": {**COS, "steps": 800}},
    "cond-122-w24-cos-800": {"unet": {**L3, **COND, "base_width": 24},
                             "train": {**COS, "steps": 800}},
    "cond-122-cos-b16x1600": {"unet": {**L3, **COND}, "train": {**COS, "steps": 1600,
                                                                  "batch_size": 16}},
}

SAMPLERS = [("dpmpp_2m", 8, "trailing"), ("dpmpp_2m", 16, "trailing"), ("ddim", 16, "trailing"),
            ("dpmpp_2m", 16, "karras")]
GUIDED = [("dpmpp_2m", 8, "trailing", 1.0), ("dpmpp_2m", 8, "trailing", 1.5),
          ("dpmpp_2m", 8, "trailing", 2.0), ("dpmpp_2m", 8, "trailing", 3.0),
          ("dpmpp_2m", 12, "trailing", 2.0), ("ddim", 12, "trailing", 2.0),
          ("dpmpp_2m", 12, "karras", 2.0)]
"""A class-conditional recipe's sampler settings: (sampler, steps, spacing, guidance)."""


def recipe_config(name: str) -> dict[str, Any]:
    cfg = {k: dict(v) for k, v in BASE.items()}
    for section, over in RECIPES[name].items():
        cfg[section].update(over)
    return cfg


def run_one(name: str, n: int, seed: int) -> dict[str, Any]:
    """Train recipe ``name`` and score ``n`` samples for each of :data:`SAMPLERS`."""
    from dataclasses import replace

    from engine.config import Config
    from engine.data.datasets import load_dataset
    from engine.device import blas
    from engine.device.bench import device_fingerprint
    from engine.measure import sample_images, sample_labels
    from engine.quality.features import DIGITS_HOLDOUT, digits_feature_network
    from engine.quality.legibility import legibility, typical_set
    from engine.training.train import init_state, train

    config = Config.from_dict(recipe_config(name))
    seen, _ = load_dataset("digits", image_size=16).split(*DIGITS_HOLDOUT)
    train_set, val_set = seen.split(0.1, config.train.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    labels = None
    if config.unet.num_classes:
        assert train_set.labels is not None and val_set.labels is not None
        labels = (train_set.labels, val_set.labels[:256])
    state = train(init_state(config), train_set.images, val_set.images[:256], labels=labels)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model = state.ema_model()
    net = digits_feature_network()
    assert seen.labels is not None
    typical = typical_set(net, seen.images, seen.labels)
    scores, agree = {}, {}
    settings = GUIDED if config.unet.num_classes else [(*s, 1.0) for s in SAMPLERS]
    for sampler, steps, spacing, w in settings:
        cfg = replace(config, schedule=replace(config.schedule, sampler=sampler, steps=steps,
                                               spacing=spacing, guidance=w))
        images = sample_images(model, cfg, n, seed)
        key = f"{sampler}-{steps}-{spacing}" + (f"-w{w:g}" if config.unet.num_classes else "")
        scores[key] = round(legibility(images, net, typical), 4)
        if config.unet.num_classes:  # the classifier reads the class each image was drawn for
            read = net.probabilities(images).argmax(axis=1)
            drawn = sample_labels(n, config.unet.num_classes)
            agree[key] = round(float((read == drawn).mean()), 4)
    return {"recipe": name, "config": recipe_config(name), "train_wall_s": round(wall, 1),
            "train_cpu_s": round(cpu, 1), "images": config.train.steps * config.train.batch_size,
            "val_loss": state.history[-1].val_loss if state.history else None,
            "legible": scores, "class_agreement": agree, "n": n, "seed": seed, "blas": blas.BLAS_NAME,
            "cpu": device_fingerprint()["chip"], "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _cores(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="recipes to run (default: all)")
    ap.add_argument("--cores", default="0", help="cores to pin to, e.g. 4-15 or 0,2")
    ap.add_argument("--n", type=int, default=200, help="samples scored per sampler setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "demo_recipes.jsonl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.n, args.seed)), flush=True)
        return
    names = args.only or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"demo_recipe: unknown recipe {unknown[0]!r} (known: {', '.join(RECIPES)})")
    cores = _cores(args.cores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < len(cores):
            core = next(c for c in cores if c not in {r[1] for r in running})
            name = pending.pop(0)
            cmd = ["taskset", "-c", str(core), sys.executable, __file__, "--child", name,
                   "--n", str(args.n), "--seed", str(args.seed)]
            running.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True),
                            core, name))
        time.sleep(1.0)
        for proc, core, name in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, core, name))
            out = proc.stdout.read() if proc.stdout else ""
            line = out.strip().splitlines()[-1] if out.strip() else ""
            if proc.returncode != 0 or not line.startswith("{"):
                print(f"{name}: failed (exit {proc.returncode})", file=sys.stderr, flush=True)
                continue
            with args.out.open("a") as f:
                f.write(line + "\n")
            r = json.loads(line)
            print(f"{name}: train {r['train_wall_s']} s wall, legible {r['legible']}", flush=True)


if __name__ == "__main__":
    main()
