"""FID against network evaluations for timestep spacings, optimised schedules and the adaptive sampler.

    uv run python benchmarks/sampling.py --checkpoint results/train/demo/checkpoint

Writes benchmarks/sampling.md (table) and prints it. One trained model, 16 px built-in
digits; FID/KID at --n samples with the real-vs-real floor at the same n.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

import engine  # noqa: F401  (binds OpenBLAS before mlx)
from engine.data.datasets import load_dataset
from engine.device.bench import device_fingerprint
from engine.experiment import sample_images
from engine.io.checkpoint import load_weights
from engine.quality.features import digits_feature_network
from engine.quality.metrics import evaluate_quality
from engine.sampling.adaptive import nfe_histogram, sample_adaptive
from engine.sampling.diffusion import denoiser
from engine.sampling.timesteps import optimize_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="results/train/demo/checkpoint")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--time-limit", type=float, default=90.0)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    parser.add_argument("--out", default="benchmarks/sampling.md")
    args = parser.parse_args()

    config, model = load_weights(args.checkpoint)
    u, s = config.unet, config.schedule
    real = load_dataset(None, image_size=u.image_size).images
    net = digits_feature_network()

    def score(images: np.ndarray) -> tuple[float, float, float]:
        q = evaluate_quality(images, real, net, args.n, 0)
        return q.fid, q.kid, q.fid_floor

    rows = []
    for k in args.nfe:
        for spacing in ("uniform", "trailing", "karras"):
            sched = replace(s, sampler=args.sampler, steps=k, spacing=spacing, timesteps=())
            fid, kid, floor = score(sample_images(model, replace(config, schedule=sched), args.n, 1))
            rows.append({"method": spacing, "nfe": k, "fid": fid, "kid": kid, "floor": floor})
            print(rows[-1], flush=True)
        start = time.perf_counter()
        found = optimize_schedule(denoiser(model, s.prediction, s.beta_schedule), (u.image_size,
                                  u.image_size, u.channels), k, s.beta_schedule, args.sampler,
                                  batch=64, seed=0, time_limit_s=args.time_limit)
        sched = replace(s, sampler=args.sampler, steps=k, spacing="optimized",
                        timesteps=found.times)
        fid, kid, floor = score(sample_images(model, replace(config, schedule=sched), args.n, 1))
        rows.append({"method": "optimized", "nfe": k, "fid": fid, "kid": kid, "floor": floor,
                     "search_s": time.perf_counter() - start, "times": found.times,
                     "val_error": [found.baseline_error, found.error]})
        print(rows[-1], flush=True)
    for tol in args.tolerances:
        noise = mx.random.normal((args.n, u.image_size, u.image_size, u.channels),
                                 key=mx.random.key(1))
        result = sample_adaptive(model, noise, s.prediction, s.beta_schedule, atol=tol, rtol=tol,
                                 max_nfe=64)
        images = np.clip(np.array(result.samples), -1, 1)
        fid, kid, floor = score(images)
        rows.append({"method": f"adaptive tol={tol}", "nfe": result.mean_nfe, "fid": fid,
                     "kid": kid, "floor": floor, "nfe_hist": nfe_histogram(result.nfe)})
        print(rows[-1], flush=True)
    write(rows, args, config)


def write(rows: list[dict], args: argparse.Namespace, config: object) -> None:
    lines = ["# FID against network evaluations (16 px digits)", "",
             f"Model: `{args.checkpoint}`; sampler {args.sampler} for the fixed grids; "
             f"FID/KID at n={args.n}; real-vs-real floor FID {rows[0]['floor']:.3f}.", "",
             "| method | NFE per sample | FID | KID |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']:.1f} | {r['fid']:.3f} | {r['kid']:.4f} |")
    lines += ["", "Optimised schedules (times, search seconds, validation error before -> after):", ""]
    for r in rows:
        if r["method"] == "optimized":
            times = ", ".join(f"{t:.3f}" for t in r["times"])
            lines.append(f"- K={r['nfe']}: [{times}], {r['search_s']:.0f} s, "
                         f"{r['val_error'][0]:.4f} -> {r['val_error'][1]:.4f}")
    lines += ["", "Adaptive sampler: evaluations per sample (count of samples):", ""]
    for r in rows:
        if "nfe_hist" in r:
            lines.append(f"- {r['method']}: {r['nfe_hist']}")
    lines += ["", f"Device: `{json.dumps(device_fingerprint())}`", ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
