#!/usr/bin/env python3
"""Accuracy of engine.device.memory's predicted peaks on configs it was not calibrated on.

  uv run python benchmarks/memory_accuracy.py [--quick] [--json results/memory_accuracy.json]

For each held-out config (none is in ``engine.device.memory.fit.CALIBRATION_CONFIGS``) it
predicts, then measures (``mx.reset_peak_memory`` / ``mx.get_peak_memory``): the training-step peak
in the four training modes (float32 / bf16, with and without per-block checkpointing)
at two batch sizes, and the sampling peak at batch 1 and 16. It prints one row per
measurement with the relative error (the demo preset's U-Net is calibration config ``c16a``, so it is not here), the share within +-20%, and the device.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from engine.config import Config, ScheduleConfig, UNetConfig  # engine binds OpenBLAS first
from engine.device.bench import device_fingerprint
from engine.device.memory.fit import CALIBRATION_CONFIGS
from engine.device.memory.measure import measure_sampling_mb, measure_train_step_mb
from engine.device.memory.model import MODES, predict

HELD_OUT = {
    "16px-3lvl-attn": UNetConfig(base_width=32, width_mults=(1, 2, 2), attn_levels=(2,),
                                 head_dim=32, time_emb_dim=64),
    "tiny": UNetConfig(image_size=8, base_width=16, width_mults=(1, 2), norm_groups=4,
                       time_emb_dim=32),
    "w24-attn": UNetConfig(base_width=24, attn_levels=(1,), head_dim=24, time_emb_dim=64),
    "8px-deep-relu": UNetConfig(image_size=8, base_width=16, width_mults=(1, 2, 2),
                                num_res_blocks=2, norm_groups=4, activation="relu",
                                time_emb_dim=32),
    "32px-narrow": UNetConfig(image_size=32, base_width=8, width_mults=(1, 2, 4), norm_groups=4,
                              time_emb_dim=32),
    "28px-sep-gelu": UNetConfig(image_size=28, base_width=16, separable=True,
                                activation="gelu", time_emb_dim=64),
    "16px-w64": UNetConfig(base_width=64, norm_groups=16, width_mults=(1, 2),
                           attn_levels=(1,), head_dim=64),
}
QUICK = ("tiny", "w24-attn", "8px-deep-relu")


def rows_for(name: str, u: UNetConfig, batches: tuple[int, ...]) -> list[dict]:
    config = Config(unet=u, schedule=ScheduleConfig(steps=3))
    out = []
    for mode, (dtype, ckpt) in MODES.items():
        cfg = replace(config, train=replace(config.train, dtype=dtype, checkpointing=ckpt))
        for b in batches:
            out.append({"config": name, "what": f"train {mode}", "batch": b,
                        "predicted_mb": predict(cfg, b).train_step_mb,
                        "measured_mb": measure_train_step_mb(cfg, b)})
    profile = predict(config, sample_n=16)
    for b, pred in ((1, profile.sample_b1_mb), (16, profile.sample_bn_mb)):
        out.append({"config": name, "what": "sample", "batch": b, "predicted_mb": pred,
                    "measured_mb": measure_sampling_mb(config, b)})
    for r in out:
        r["error"] = (r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"]
        print(f"{name:<14} {r['what']:<19} {r['batch']:>5} {r['predicted_mb']:9.1f} "
              f"{r['measured_mb']:9.1f} {r['error']:+8.1%}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three small configs, one batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    assert not set(HELD_OUT.values()) & set(CALIBRATION_CONFIGS.values())
    names = QUICK if args.quick else tuple(HELD_OUT)
    batches = (16,) if args.quick else (8, 32)
    print(f"{'config':<14} {'what':<19} {'batch':>5} {'pred MB':>9} {'meas MB':>9} {'error':>8}")
    rows = [r for n in names for r in rows_for(n, HELD_OUT[n], batches)]
    errors = [abs(r["error"]) for r in rows]
    within = sum(e <= 0.2 for e in errors) / len(errors)
    print(f"\n{len(rows)} predictions: {within:.0%} within +-20%, median |error| "
          f"{sorted(errors)[len(errors) // 2]:.1%}, worst {max(errors):.1%}")
    device = device_fingerprint()
    print(json.dumps(device))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "device": device}, indent=1))


if __name__ == "__main__":
    main()
