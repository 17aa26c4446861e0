#!/usr/bin/env python3
"""The compression table for one trained model: prune, int8/int4 weights, fp16/bf16 casts.

  uv run python benchmarks/compression.py                       # ~30 min on 2 shared cores
  uv run python benchmarks/compression.py --checkpoint PATH     # compress a trained model
  uv run python benchmarks/compression.py --quick               # 8 px smoke run, ~3 min

Without ``--checkpoint`` it trains a small U-Net on the built-in 16 px digits (cached
under ``--work``, so a re-run skips it). It then runs :func:`engine.compression.compress.compress`:
each method's levels from mild to aggressive, each level scored by FID of ``--n`` samples
against real digits on the shipped feature network (same seeds at every level), kept
while the FID rises at most ``--max-fid-increase`` over the baseline and otherwise rolled
back. Every row carries the size on disk (safetensors), the peak sampling memory at batch
``--memory-batch``, the batch-1 sampling latency (median of >= 5 after warm-up) and the
FID change. The table goes to stdout and, as Markdown with the device, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from engine.compression.compress import compress, fid_evaluator, format_table
from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.data.datasets import load_dataset
from engine.device.bench import device_fingerprint  # first: engine binds OpenBLAS before mlx loads
from engine.io.checkpoint import load_weights, save_checkpoint
from engine.quality.features import feature_network_for
from engine.quality.metrics import evaluate_quality
from engine.training.train import init_state, train

MODEL = Config(
    unet=UNetConfig(image_size=16, base_width=16, width_mults=(1, 2), norm_groups=4,
                    time_emb_dim=64),
    schedule=ScheduleConfig(sampler="ddim", steps=10),
    train=TrainConfig(steps=800, batch_size=32, learning_rate=2e-3, warmup_steps=50,
                      ema_decay=0.995, eval_every=200))
QUICK = Config(
    unet=UNetConfig(image_size=8, base_width=16, width_mults=(1, 2), norm_groups=4,
                    time_emb_dim=32),
    schedule=ScheduleConfig(sampler="ddim", steps=10),
    train=TrainConfig(steps=150, batch_size=32, warmup_steps=20, ema_decay=0.99, eval_every=50))


def trained_model(config: Config, dataset, work: Path, checkpoint: Path | None):
    """Load ``checkpoint``, or train ``config`` once and cache it under ``work``."""
    folder = checkpoint or work / "model"
    if not (folder / "ema.safetensors").exists():
        if checkpoint is not None:
            raise SystemExit(f"{checkpoint}: no checkpoint there")
        train_set, val_set = dataset.split(0.1, 0)
        start = time.perf_counter()
        state = train(init_state(config), train_set.images, val_set.images,
                      callback=lambda p: print(f"step {p.step} val {p.val_loss:.4f}", flush=True))
        print(f"trained {config.train.steps} steps in {time.perf_counter() - start:.0f} s")
        save_checkpoint(state, folder)
    return load_weights(folder)


def markdown(result, config: Config, floor: float, noise: list[str], args, device: dict) -> str:
    rows = [("| method | level | size on disk (MB) | peak sampling MB (batch "
            f"{args.memory_batch}) | latency ms (batch 1, {config.schedule.steps} steps) | "
            "latency vs baseline | FID | FID change | result |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        rows.append(f"| {r.method} | {r.level} | {r.size_mb:.3f} | {r.peak_sample_mb:.2f} | "
                    f"{r.latency_ms:.1f} (±{r.latency_spread:.0%}) | {r.latency_ratio:.2f}x | "
                    f"{r.fid:.2f} | {r.fid_change:+.1%} | "
                    f"{'kept' if r.kept else 'rolled back'} |")
    return "\n".join([
        f"# Compression table (max FID increase {args.max_fid_increase:.0%})", "",
        (f"Model: `{json.dumps(config.unet.__dict__)}`, {config.schedule.sampler} "
        f"{config.schedule.steps} steps."), "",
        (f"FID on {args.n} samples vs {args.n} real digits; real-vs-real floor {floor:.2f}. "
        f"Pruned levels are fine-tuned {args.finetune_steps} steps (extra training: an "
        "under-trained baseline can improve). Noise of the gate: the baseline's FID on "
        f"other sampling seeds changes by {', '.join(noise)}."),
        f"Kept recipe: {[s['method'] + ':' + str(s['level']) for s in result.recipe]}", "",
        *rows, "", f"Device: `{json.dumps(device)}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (engine.io.checkpoint)")
    parser.add_argument("--work", type=Path, default=Path("results/compression-bench"))
    parser.add_argument("--out", type=Path, help="Markdown output (default: WORK/table.md)")
    parser.add_argument("--n", type=int, default=1000, help="FID sample count")
    parser.add_argument("--max-fid-increase", type=float, default=0.10)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--memory-batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    config = QUICK if args.quick else MODEL
    if args.quick:
        args.n, args.finetune_steps, args.work = 200, 40, args.work / "quick"
    dataset = load_dataset(None, image_size=config.unet.image_size)
    config, model = trained_model(config, dataset, args.work, args.checkpoint)
    net = feature_network_for(dataset, args.work / "feature-nets")
    floor = evaluate_quality(dataset.images[:args.n], dataset.images, net, args.n).fid_floor
    train_set, val_set = dataset.split(0.1, 0)
    finetune = replace(config, train=replace(config.train, batch_size=32))
    result = compress(model, finetune, fid_evaluator(config, dataset.images, net, args.n),
                      args.max_fid_increase, data=(train_set.images, val_set.images),
                      finetune_steps=args.finetune_steps, memory_batch=args.memory_batch,
                      log=lambda line: print(line, flush=True))
    # The gate's noise: the same baseline, scored on other sampling seeds.
    spread = [fid_evaluator(config, dataset.images, net, args.n, seed)(model)
              for seed in (10_000, 20_000)]
    noise = [f"{(f - result.rows[0].fid) / result.rows[0].fid:+.1%}" for f in spread]
    device = device_fingerprint()
    print(format_table(result))
    print(f"real-vs-real FID floor at n={args.n}: {floor:.2f}; baseline FID on other sampling "
          f"seeds: {', '.join(noise)}\n{json.dumps(device)}")
    out = args.out or args.work / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result, config, floor, noise, args, device))
    (out.with_suffix(".json")).write_text(json.dumps({**result.to_dict(), "floor": floor,
                                                      "device": device}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
