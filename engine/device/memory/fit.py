"""Calibration of the memory model: measure a spread of U-Nets, fit the coefficients.

:func:`calibrate` measures every :data:`CALIBRATION_CONFIGS` entry in every mode
(:func:`collect`, the slow part: ~30 min on 2 shared CPU cores), then per mode picks the
op window and fits the non-negative coefficients of :mod:`engine.device.memory.model`
(:func:`fit_modes`). Its result has the layout of ``calibration.json``; write it there
with ``uv run python benchmarks/memory_calibrate.py --write``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.device.bench import device_fingerprint, train_throughput
from engine.device.memory.measure import measure_sampling_mb, measure_train_step_mb
from engine.device.memory.model import (
    KINDS,
    MB,
    MODES,
    UPDATE_COPIES,
    analytic,
    peak_mb,
    training_variant,
)

_U = UNetConfig
CALIBRATION_CONFIGS: dict[str, UNetConfig] = {
    "c8": _U(image_size=8, base_width=8, norm_groups=4, time_emb_dim=32),
    "c16": _U(base_width=16, norm_groups=8, time_emb_dim=64),
    "c16a": _U(base_width=32, attn_levels=(1,), head_dim=32),
    "deep": _U(base_width=16, width_mults=(1, 2, 2), num_res_blocks=2, attn_levels=(1, 2),
               head_dim=16),
    "sep": _U(base_width=16, separable=True, norm="layer", activation="gelu"),
    "tconv": _U(base_width=16, resample="transposed", activation="relu"),
    "c32": _U(image_size=32, base_width=16, width_mults=(1, 2, 2), time_emb_dim=64),
    "c28a": _U(image_size=28, base_width=16, attn_levels=(1,), head_dim=16),
    "wide": _U(base_width=48, norm_groups=8),
    "rgb": _U(image_size=8, channels=3, base_width=32, width_mults=(1, 2, 4)),
    "mid3": _U(base_width=24, width_mults=(1, 2, 3), num_res_blocks=2, norm_groups=8),
    "c32a": _U(image_size=32, base_width=32, attn_levels=(1,), head_dim=32),
    "sep2": _U(base_width=32, separable=True),
    "sep3": _U(image_size=8, base_width=16, width_mults=(1, 2, 2), separable=True,
               attn_levels=(2,), head_dim=16, norm_groups=4),
    "tconv2": _U(image_size=32, base_width=16, width_mults=(1, 2, 2), resample="transposed",
                 attn_levels=(2,), head_dim=16),
    "att16": _U(base_width=16, attn_levels=(0, 1), head_dim=16, activation="relu"),
    "att8": _U(image_size=8, base_width=32, attn_levels=(0,), head_dim=8, activation="gelu"),
    "gelu": _U(base_width=24, width_mults=(1, 2, 2), num_res_blocks=2, activation="gelu",
               norm_groups=4),
}
"""What :func:`calibrate` measures: widths, depths, resolutions, attention, separable
and transposed convs, activations and channel counts of the search spaces."""
TRAIN_BATCHES, SAMPLE_BATCHES = (4, 16, 48), (1, 8, 32)
WINDOWS = (100, 150, 200, 300, 400, 600)
TIME_CONFIGS = ("c16", "c16a", "deep", "c32")


def collect(configs: dict[str, UNetConfig], log: Any = print) -> list[dict[str, Any]]:
    """Measure every calibration config in every mode (the slow part of :func:`calibrate`)."""
    rows = []
    for name, u in configs.items():
        cfg = Config(unet=u, schedule=ScheduleConfig(steps=3), train=TrainConfig())
        for b in SAMPLE_BATCHES:
            rows.append({"name": name, "unet": asdict(u), "mode": "sample", "batch": b,
                         "mb": measure_sampling_mb(cfg, b)})
        for mode, (dtype, ckpt) in MODES.items():
            for b in TRAIN_BATCHES:
                mb = measure_train_step_mb(training_variant(cfg, dtype, ckpt), b)
                rows.append({"name": name, "unet": asdict(u), "mode": mode, "batch": b, "mb": mb})
        log(f"measured {name}")
    return rows


def _nnls(a: np.ndarray, b: np.ndarray, iters: int = 4000) -> np.ndarray:
    """Non-negative least squares by projected gradient on column-scaled ``a``."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    an = a / scale
    x, step = np.zeros(a.shape[1]), 1.0 / np.linalg.norm(an, 2) ** 2
    for _ in range(iters):
        x = np.maximum(0.0, x - step * an.T @ (an @ x - b))
    return x / scale


def _unet(row: dict[str, Any]) -> UNetConfig:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in row["unet"].items()}
    return UNetConfig(**fields)


def _fit_mode(rows: list[dict[str, Any]], window: int, acts: bool) -> dict[str, Any]:
    """Alternate: pick each row's peak window with the current coefficients, then refit.

    The unknowns, in MB columns: the per-call floor, the parameter copies, (in training)
    the kept activations, and one coefficient per size kind.
    """
    cache = {(r["name"], r["batch"]): analytic(_unet(r), window, r["batch"]) for r in rows}
    coef = np.ones(len(KINDS))
    fit: dict[str, Any] = {}
    for _ in range(6):
        design = []
        for r in rows:
            a = cache[r["name"], r["batch"]]
            w = a.windows[int(np.argmax(a.windows @ coef))]
            design.append([MB / 4, a.params] + ([r["batch"] * a.acts] if acts else [])
                          + list(r["batch"] * w))
        x = 4 * np.array(design) / MB
        y = np.array([r["mb"] for r in rows])
        if acts:  # rows whose peak is the update phase say nothing about activations
            live = y > 1.15 * UPDATE_COPIES * x[:, 1]
            x, y = x[live], y[live]
        c = _nnls(x / y[:, None], np.ones(len(y)))
        coef = c[2 + acts:]
        fit = {"window_ops": window, "floor_mb": float(c[0]), "params": float(c[1]),
               "acts": float(c[2]) if acts else 0.0,
               "update_copies": UPDATE_COPIES if acts else 0,
               "kinds": {k: float(v) for k, v in zip(KINDS, coef)}}
    return fit


def _errors(rows: list[dict[str, Any]], fit: dict[str, Any]) -> list[float]:
    return [(peak_mb(_unet(r), r["batch"], fit) - r["mb"]) / r["mb"] for r in rows]


def fit_modes(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Per mode, the window and coefficients with the smallest leave-one-config-out error."""
    fits, loo = {}, {}
    for mode in ("sample", *MODES):
        data = [r for r in rows if r["mode"] == mode]
        if not data:
            continue
        best: tuple[float, int] | None = None
        for window in WINDOWS:
            errs = []
            for held in sorted({r["name"] for r in data}):
                fit = _fit_mode([r for r in data if r["name"] != held], window, mode != "sample")
                errs += _errors([r for r in data if r["name"] == held], fit)
            worst = float(np.max(np.abs(errs)))
            if best is None or worst < best[0]:
                best = (worst, window)
        assert best is not None  # WINDOWS is not empty
        loo[mode] = best[0]
        fits[mode] = _fit_mode(data, best[1], mode != "sample")
    return fits, loo


def calibrate(configs: dict[str, UNetConfig] | None = None, log: Any = print,
              rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measure the calibration configs and fit every mode.

    Args:
        configs: the U-Nets to measure (default :data:`CALIBRATION_CONFIGS`).
        log: called with a line after each config is measured.
        rows: peaks :func:`collect` measured before; given, nothing is measured again
            (only the step times).

    Returns:
        A new table in the layout of :data:`engine.device.memory.model.CALIBRATION`.
    """
    rows = rows if rows is not None else collect(configs or CALIBRATION_CONFIGS, log)
    fits, loo = fit_modes(rows)
    times: dict[str, list[float]] = {"checkpointing": [], "bfloat16": []}
    for name in TIME_CONFIGS:
        cfg = Config(unet=CALIBRATION_CONFIGS[name], train=TrainConfig(batch_size=16))
        base = train_throughput(cfg, steps=5)
        ckpt = train_throughput(training_variant(cfg, "float32", True), 5)
        low = train_throughput(training_variant(cfg, "bfloat16", False), 5)
        times["checkpointing"].append(base / ckpt)
        times["bfloat16"].append(base / low)
    fp = device_fingerprint()
    return {"fitted_on": {"mlx": fp["mlx"], "backend": fp["backend"], "blas": fp["blas"],
                          "chip": fp["chip"]},
            "fits": fits, "loo_max_error": loo,
            "time": {k: float(np.median(v)) for k, v in times.items()}}
