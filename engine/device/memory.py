"""Peak memory of a candidate: predicted from analytic sizes, measured, and enforced.

Why a window. MLX evaluates a graph asynchronously: the main thread allocates each op's
output and queues the op; buffers are freed only as the compute thread retires ops. The
main thread runs up to a few hundred ops ahead, so the peak is not one layer's working
set but the sum over a window of consecutive ops (on the 2-core CPU a chain of 1 MB
element-wise ops held ~200 MB live). A GroupNorm is ~24 ops, so norms weigh heavily.

The model, per mode (sampling; training in float32 or bf16/fp16, with or without
checkpointing), in bytes::

    peak = 4 * max(c_update * P,
                   c_P * P + B * (c_act * acts + max_i sum_{j in window(i)} c . size(j)))

``P`` is the parameter count. ``size(j)`` holds layer ``j``'s per-image elements by kind
from :func:`engine.model.cost.layers`: im2col of a dense conv, output, depthwise im2col, norm,
per-position linears, attention scores ``L^2 * heads``. ``acts`` sums every layer's output
(what backward keeps); ``window(i)`` is the layers from ``i`` whose op count (``_OPS``)
fits in the fitted window. ``c_update = 7`` copies of the parameters coexist during the
AdamW and EMA updates. The other ``c`` are non-negative least-squares fits of relative
error against ``mx.get_peak_memory`` (:func:`calibrate`)::

    uv run python -m engine.device.memory --calibrate     # ~30 min on 2 shared CPU cores

The coefficients below were fitted on MLX 0.32.4, CPU backend, OpenBLAS, Linux x86-64
(:data:`CALIBRATION` ``["fitted_on"]``); on another backend (Metal, CUDA) re-run it.
Held-out accuracy: ``benchmarks/memory_accuracy.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from engine.device.bench import device_fingerprint, train_throughput
from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.model.cost import Layer, layers, param_count
from engine.sampling.samplers import generate
from engine.training.train import VAL_BATCH, init_state, train
from engine.model.unet import UNet

__all__ = [
    "CALIBRATION",
    "CALIBRATION_CONFIGS",
    "MemoryBudgetExceeded",
    "MemoryProfile",
    "Option",
    "Recommendation",
    "calibrate",
    "check_budget",
    "check_peak",
    "enforce_limit",
    "format_report",
    "measure_sampling_mb",
    "measure_train_step_mb",
    "predict",
    "recommend",
    "release",
]

MB = 2**20
KINDS = ("col", "out", "dwcol", "norm", "lin", "score")
# Ops MLX queues per layer kind (counted with mx.export_to_dot on the U-Net's modules):
# a GroupNorm is ~24 ops plus 2 for its activation; a conv is pad/conv/bias-add.
_OPS = {"conv": 3, "convT": 3, "dwconv": 3, "norm": 26, "linear": 4, "attention": 14}
STATE_COPIES = {"weights": 1, "optimizer": 2, "ema": 1}  # float32 copies of the parameters
# Peak of the update phase in parameter copies: weights, gradients, AdamW m and v, EMA,
# plus the new weights, m and v before the old ones are freed (7 measured: 6.9).
UPDATE_COPIES = 7

# Written by `python -m engine.device.memory --calibrate` (17 configs x 4 training modes x 3
# batches + sampling at 3 batches); see the module docstring.
CALIBRATION: dict[str, Any] = {
    "fitted_on": {"mlx": "0.32.4", "backend": "cpu", "chip": "Intel(R) Xeon(R) Processor",
                  "blas": "openblas (/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0)"},
    # Step time relative to float32 without checkpointing (medians over 4 configs, batch 16).
    "time": {"checkpointing": 1.43, "bfloat16": 1.8},
    # Worst leave-one-config-out relative error of each mode over the calibration configs.
    "loo_max_error": {"sample": 0.2214, "float32": 0.1513, "float32+ckpt": 0.218, "low": 0.1863,
                      "low+ckpt": 0.1359},
    "fits": {
        "sample": {"window_ops": 300, "params": 1.007, "acts": 0.0, "update_copies": 0,
            "kinds": {"col": 0.2049, "out": 0.0, "dwcol": 0.0, "norm": 5.733,
                      "lin": 1.765, "score": 0.0}},
        "float32": {"window_ops": 300, "params": 4.067, "acts": 1.676, "update_copies": 7,
            "kinds": {"col": 0.2327, "out": 0.0, "dwcol": 0.0, "norm": 7.52,
                      "lin": 1.755, "score": 0.8302}},
        "float32+ckpt": {"window_ops": 300, "params": 4.411, "acts": 0.0, "update_copies": 7,
            "kinds": {"col": 0.2174, "out": 0.7284, "dwcol": 0.0, "norm": 9.18,
                      "lin": 2.838, "score": 0.7445}},
        "low": {"window_ops": 150, "params": 4.681, "acts": 1.061, "update_copies": 7,
            "kinds": {"col": 0.4276, "out": 0.0, "dwcol": 0.0, "norm": 7.821,
                      "lin": 0.0, "score": 0.0}},
        "low+ckpt": {"window_ops": 300, "params": 4.636, "acts": 0.0, "update_copies": 7,
            "kinds": {"col": 0.2882, "out": 1.097, "dwcol": 0.0, "norm": 5.635,
                      "lin": 2.436, "score": 0.0}},
    },
}


# --------------------------------------------------------------------------- sizes

def _kernel(layer: Layer) -> int:
    groups = layer.cin if layer.kind == "dwconv" else 1
    return round(((layer.params - layer.cout) / ((layer.cin // groups) * layer.cout)) ** 0.5)


def _sizes(layer: Layer, head_dim: int) -> dict[str, int]:
    """Elements per image of each size kind for one layer."""
    s = dict.fromkeys(KINDS, 0)
    pixels = layer.out_elems // max(layer.cout, 1)
    if layer.kind in ("conv", "convT"):
        k = 4 if layer.kind == "convT" else _kernel(layer)
        s["col"] = pixels * k * k * layer.cin if k > 1 else 0
        s["out"] = layer.out_elems
    elif layer.kind == "dwconv":
        s["dwcol"], s["out"] = 9 * layer.out_elems, layer.out_elems
    elif layer.kind == "norm":
        s["norm"] = layer.out_elems
    elif layer.kind == "linear" and layer.out_elems != layer.cout:  # per-position linears
        s["lin"] = layer.out_elems
    elif layer.kind == "attention":
        positions = layer.resolution**2
        s["score"] = positions * positions * (layer.cin // head_dim)
        s["lin"] = layer.out_elems
    return s


@dataclass(frozen=True)
class _Analytic:
    params: int
    acts: int                 # sum of per-position outputs, per image
    windows: np.ndarray       # (layers, kinds): size sums over each op window, per image


def _analytic(u: UNetConfig, window_ops: int) -> _Analytic:
    ls = layers(u)
    sizes = np.array([[_sizes(layer, u.head_dim)[k] for k in KINDS] for layer in ls], float)
    ops = np.cumsum([0] + [_OPS[layer.kind] for layer in ls])
    cum = np.vstack([np.zeros(len(KINDS)), np.cumsum(sizes, axis=0)])
    ends = np.maximum(np.searchsorted(ops, ops[:-1] + window_ops, side="right") - 1,
                      np.arange(1, len(ls) + 1))
    windows = cum[ends] - cum[:-1]
    acts = sum(layer.out_elems for layer in ls if layer.out_elems != layer.cout
               or layer.kind != "linear")
    return _Analytic(param_count(u), int(acts), windows)


def _mode(dtype: str, checkpointing: bool) -> str:
    return ("float32" if dtype == "float32" else "low") + ("+ckpt" if checkpointing else "")


def _peak_mb(u: UNetConfig, batch: int, fit: dict[str, Any]) -> float:
    a = _analytic(u, int(fit["window_ops"]))
    coef = np.array([fit["kinds"][k] for k in KINDS])
    per_image = fit.get("acts", 0.0) * a.acts + float(np.max(a.windows @ coef))
    # During the AdamW and EMA updates old and new copies of the state coexist.
    update = fit.get("update_copies", 0) * a.params
    return 4 * max(update, fit["params"] * a.params + batch * per_image) / MB


# --------------------------------------------------------------------------- predict

@dataclass(frozen=True)
class MemoryProfile:
    """Predicted memory of one candidate, in MB.

    ``train_step_mb`` is the peak of a training step at ``batch`` (weights, gradients,
    AdamW state, EMA and activations); ``validation_mb`` the peak of the validation
    forward that :func:`engine.training.train.train` runs at ``val_batch`` images with the same
    state resident; ``train_peak_mb`` the larger of the two. Sampling peaks include the
    weights.
    """

    batch: int
    dtype: str
    checkpointing: bool
    params: int
    weights_mb: float
    optimizer_mb: float
    ema_mb: float
    train_step_mb: float
    val_batch: int
    validation_mb: float
    train_peak_mb: float
    sample_b1_mb: float
    sample_n: int
    sample_bn_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(config: Config, batch: int | None = None, sample_n: int = 16,
            val_batch: int | None = None) -> MemoryProfile:
    """Predict the memory of ``config`` without building or running it.

    Args:
        config: the candidate; ``train.dtype`` and ``train.checkpointing`` pick the mode.
        batch: training batch (default ``config.train.batch_size``).
        sample_n: the larger sampling batch.
        val_batch: images per validation forward (default: the chunk that
            :func:`engine.training.train.validation_loss` uses, the training batch size).
    """
    u, t = config.unet, config.train
    batch = batch or t.batch_size
    val_batch = val_batch or min(VAL_BATCH, t.batch_size)
    fits = CALIBRATION["fits"]
    p_mb = 4 * param_count(u) / MB
    step = _peak_mb(u, batch, fits[_mode(t.dtype, t.checkpointing)])
    sample = fits["sample"]
    # Validation: the training state stays resident, plus the EMA model it evaluates.
    resident = (sum(STATE_COPIES.values()) + 1) * p_mb
    validation = resident + _peak_mb(u, val_batch, {**sample, "params": 0.0})
    return MemoryProfile(
        batch=batch, dtype=t.dtype, checkpointing=t.checkpointing, params=param_count(u),
        weights_mb=p_mb, optimizer_mb=STATE_COPIES["optimizer"] * p_mb,
        ema_mb=STATE_COPIES["ema"] * p_mb, train_step_mb=step, val_batch=val_batch,
        validation_mb=validation, train_peak_mb=max(step, validation),
        sample_b1_mb=_peak_mb(u, 1, sample), sample_n=sample_n,
        sample_bn_mb=_peak_mb(u, sample_n, sample))


# --------------------------------------------------------------------------- recommend

@dataclass(frozen=True)
class Option:
    """A memory-saving training option and what it costs in time."""

    name: str
    train_step_mb: float
    saving_mb: float
    saving: float          # fraction of the plain float32 step peak
    max_batch: int
    time_factor: float     # step time relative to plain float32 (1.3 = 30% slower)
    time_source: str       # "measured" here, or "calibration" (median of the fit configs)


@dataclass(frozen=True)
class Recommendation:
    """What fits in ``budget_mb``; the table rows are (batch, float32, +ckpt, bf16) MB."""

    budget_mb: float
    fits: bool
    reason: str
    batch: int
    max_batch: int
    options: tuple[Option, ...]
    table: tuple[tuple[int, float, float, float], ...]
    profile: MemoryProfile


BATCHES = tuple(2**i for i in range(9))  # 1 ... 256


def _variant(config: Config, dtype: str, checkpointing: bool) -> Config:
    return replace(config, train=replace(config.train, dtype=dtype, checkpointing=checkpointing))


def _max_batch(config: Config, budget_mb: float, limit: int = 4096) -> int:
    """Largest training batch whose predicted step peak fits (0: not even batch 1)."""
    lo, hi = 0, 1
    while hi <= limit and predict(config, hi).train_step_mb <= budget_mb:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the step peak grows monotonically with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predict(config, mid).train_step_mb <= budget_mb else (lo, mid)
    return lo


def _time_factors(config: Config, measure: bool) -> tuple[dict[str, float], str]:
    if not measure:
        return dict(CALIBRATION["time"]), "calibration"
    base = train_throughput(_variant(config, "float32", False), steps=5)
    return {"checkpointing": base / train_throughput(_variant(config, "float32", True), steps=5),
            "bfloat16": base / train_throughput(_variant(config, "bfloat16", False), steps=5),
            }, "measured"


def recommend(config: Config, budget_mb: float, measure_time: bool = False) -> Recommendation:
    """The largest batch that fits ``budget_mb``, and what checkpointing and bf16 save.

    Args:
        config: the candidate.
        budget_mb: memory available to one trial.
        measure_time: time a few training steps of each option here (seconds to a
            minute) instead of using the calibration's median time factors.
    """
    plain = _variant(config, "float32", False)
    base = predict(plain)
    factors, source = _time_factors(config, measure_time)
    options = []
    for name, variant in (("checkpointing", _variant(config, "float32", True)),
                          ("bfloat16", _variant(config, "bfloat16", False)),
                          ("bfloat16+checkpointing", _variant(config, "bfloat16", True))):
        step = predict(variant).train_step_mb
        factor = (factors["checkpointing"] * factors["bfloat16"] if "+" in name
                  else factors[name])
        options.append(Option(name, step, base.train_step_mb - step,
                              1 - step / base.train_step_mb, _max_batch(variant, budget_mb),
                              factor, source))
    profile = predict(config)
    max_batch = _max_batch(config, budget_mb)
    fits = profile.train_peak_mb <= budget_mb
    reason = _reason(profile, budget_mb, max_batch, options)
    table = tuple((b, predict(plain, b).train_step_mb,
                   predict(_variant(config, "float32", True), b).train_step_mb,
                   predict(_variant(config, "bfloat16", False), b).train_step_mb)
                  for b in BATCHES)
    return Recommendation(budget_mb, fits, reason, profile.batch, max_batch, tuple(options),
                          table, profile)


def _reason(p: MemoryProfile, budget: float, max_batch: int, options: list[Option]) -> str:
    if p.train_peak_mb <= budget:
        return (f"fits: predicted training peak {p.train_peak_mb:.0f} MB <= budget "
                f"{budget:.0f} MB")
    if p.validation_mb > budget and p.train_step_mb <= budget:
        return (f"the training step fits ({p.train_step_mb:.0f} MB) but validation at batch "
                f"{p.val_batch} needs {p.validation_mb:.0f} MB > {budget:.0f} MB")
    if max_batch == 0 and all(o.max_batch == 0 for o in options):
        return (f"does not fit at all: even batch 1 with checkpointing and bf16 exceeds "
                f"{budget:.0f} MB")
    best = max(options, key=lambda o: o.max_batch)
    return (f"batch {p.batch} needs {p.train_step_mb:.0f} MB > {budget:.0f} MB: use batch "
            f"<= {max_batch}, or {best.name} (batch <= {best.max_batch})")


def format_report(config: Config, budget_mb: float | None = None,
                  measure_time: bool = False) -> str:
    """What ``diffnas memory --config cfg.json [--budget-mb M]`` prints."""
    rec = recommend(config, float("inf") if budget_mb is None else budget_mb, measure_time)
    meta = CALIBRATION["fitted_on"]
    return "\n".join([*_summary(rec.profile), "", *_table(rec, budget_mb), "",
                      *_options(rec, budget_mb),
                      (f"(predicted; calibrated on MLX {meta['mlx']}, {meta['backend']}, "
                      f"{meta['blas']})")])


def _summary(p: MemoryProfile) -> list[str]:
    ckpt = ", checkpointing" if p.checkpointing else ""
    return [(f"params {p.params:,}: weights {p.weights_mb:.1f} MB, AdamW state "
            f"{p.optimizer_mb:.1f} MB, EMA {p.ema_mb:.1f} MB"),
            (f"sampling peak: batch 1 {p.sample_b1_mb:.1f} MB, batch {p.sample_n} "
            f"{p.sample_bn_mb:.1f} MB"),
            (f"training peak at batch {p.batch} ({p.dtype}{ckpt}): step {p.train_step_mb:.1f} MB,"
            f" validation forward (batch {p.val_batch}) {p.validation_mb:.1f} MB")]


def _table(rec: Recommendation, budget_mb: float | None) -> list[str]:
    lines = [f"{'batch':>6} {'float32':>9} {'+ckpt':>9} {'bf16':>9}   training step peak, MB"]
    for b, f32, ckpt, low in rec.table:
        over = "  over budget" if budget_mb is not None and f32 > budget_mb else ""
        lines.append(f"{b:>6} {f32:>9.1f} {ckpt:>9.1f} {low:>9.1f}{over}")
    return lines


def _options(rec: Recommendation, budget_mb: float | None) -> list[str]:
    lines = [f"{o.name:<23} saves {o.saving_mb:7.1f} MB ({o.saving:.0%}) at {o.time_factor:.2f}x"
             f" step time ({o.time_source})"
             + ("" if budget_mb is None else f"; largest batch {o.max_batch}")
             for o in rec.options]
    if budget_mb is not None:
        lines.append(f"budget {budget_mb:.0f} MB: largest float32 batch {rec.max_batch}; "
                     f"{rec.reason}")
    return lines


# --------------------------------------------------------------------------- enforce

class MemoryBudgetExceeded(ValueError):
    """A candidate needs more memory than its budget: the trial is infeasible."""

    def __init__(self, what: str, needed_mb: float, budget_mb: float, source: str):
        super().__init__(f"{what} {source} {needed_mb:.0f} MB exceeds the budget of "
                         f"{budget_mb:.0f} MB")
        self.what, self.needed_mb, self.budget_mb, self.source = what, needed_mb, budget_mb, source


def check_budget(config: Config, budget_mb: float, batch: int | None = None) -> MemoryProfile:
    """Fail fast, before any allocation, when the predicted training peak is over budget.

    Raises:
        MemoryBudgetExceeded: naming the predicted peak and the budget.
    """
    profile = predict(config, batch)
    if profile.train_step_mb > budget_mb:
        raise MemoryBudgetExceeded(f"training at batch {profile.batch}", profile.train_step_mb,
                                   budget_mb, "predicted")
    if profile.validation_mb > budget_mb:
        raise MemoryBudgetExceeded(f"validation at batch {profile.val_batch}",
                                   profile.validation_mb, budget_mb, "predicted")
    return profile


@contextmanager
def enforce_limit(limit_mb: float, config: Config | None = None, batch: int | None = None,
                  cache_limit_mb: float | None = None) -> Iterator[None]:
    """Run a block under a memory budget.

    Before: if ``config`` is given, :func:`check_budget` rejects it without running. During:
    ``mx.set_memory_limit`` makes MLX wait for queued ops to retire instead of allocating
    past the limit (on the CPU it lowers the peak; it never raises). After: the measured
    ``mx.get_peak_memory`` is checked against the limit, because the limit is advisory.
    The previous limits are restored in every case.

    Raises:
        MemoryBudgetExceeded: predicted (before) or measured (after) over ``limit_mb``.
    """
    if config is not None:
        check_budget(config, limit_mb, batch)
    release()
    previous = mx.set_memory_limit(int(limit_mb * MB))
    previous_cache = mx.set_cache_limit(int((cache_limit_mb or limit_mb) * MB))
    try:
        yield
        check_peak(limit_mb)
    finally:
        mx.set_memory_limit(previous)
        mx.set_cache_limit(previous_cache)


def check_peak(limit_mb: float, what: str = "the run") -> float:
    """The measured peak (MB) since the last reset; raises when it is over ``limit_mb``.

    Call it between the phases of a run under :func:`enforce_limit`, so that an overrun
    ends the run at the next phase instead of at the end.

    Raises:
        MemoryBudgetExceeded: naming ``what``, the measured peak and the limit.
    """
    mx.synchronize()
    peak = mx.get_peak_memory() / MB
    if peak > limit_mb:
        raise MemoryBudgetExceeded(what, peak, limit_mb, "measured")
    return peak


def release(cache_limit_mb: float | None = None) -> None:
    """Between trials: drop dead arrays, empty MLX's buffer cache, reset the peak counter."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    if cache_limit_mb is not None:
        mx.set_cache_limit(int(cache_limit_mb * MB))
    mx.reset_peak_memory()


# --------------------------------------------------------------------------- measure

def _measured_peak_mb(fn: Any) -> float:
    """Peak MB that ``fn`` added on top of what the process already held."""
    release()
    held = mx.get_active_memory()
    fn()
    mx.synchronize()
    return (mx.get_peak_memory() - held) / MB


def measure_train_step_mb(config: Config, batch: int | None = None, steps: int = 2) -> float:
    """Measured peak of building the state and ``steps`` compiled training steps.

    Like :func:`engine.device.bench.training_peak_mb`, this runs no validation forward.
    """
    batch = batch or config.train.batch_size
    cfg = replace(config, train=replace(config.train, batch_size=batch, steps=10**6,
                                        eval_every=10**6))
    u = cfg.unet
    images = np.zeros((batch, u.image_size, u.image_size, u.channels), np.float32)
    return _measured_peak_mb(lambda: train(init_state(cfg), images, images[:1], until=steps))


def measure_sampling_mb(config: Config, batch: int) -> float:
    """Measured peak of building a model and drawing ``batch`` images (weights included)."""
    u = config.unet

    def run() -> None:
        model = UNet(u)
        mx.eval(model.parameters())
        generate(model, config.schedule, batch, 0, u.image_size, u.channels)

    return _measured_peak_mb(run)


# --------------------------------------------------------------------------- calibrate

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
MODES = {"float32": ("float32", False), "float32+ckpt": ("float32", True),
         "low": ("bfloat16", False), "low+ckpt": ("bfloat16", True)}
WINDOWS = (100, 150, 200, 300)
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
                mb = measure_train_step_mb(_variant(cfg, dtype, ckpt), b)
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
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in row["unet"].items()})


def _fit_mode(rows: list[dict[str, Any]], window: int, acts: bool) -> dict[str, Any]:
    """Alternate: pick each row's peak window with the current coefficients, then refit."""
    cache = {r["name"]: _analytic(_unet(r), window) for r in rows}
    coef = np.ones(len(KINDS))
    fit: dict[str, Any] = {}
    for _ in range(6):
        design = []
        for r in rows:
            a = cache[r["name"]]
            w = a.windows[int(np.argmax(a.windows @ coef))]
            design.append([a.params] + ([r["batch"] * a.acts] if acts else [])
                          + list(r["batch"] * w))
        x = 4 * np.array(design) / MB
        y = np.array([r["mb"] for r in rows])
        if acts:  # rows whose peak is the update phase say nothing about activations
            live = y > 1.15 * UPDATE_COPIES * x[:, 0]
            x, y = x[live], y[live]
        c = _nnls(x / y[:, None], np.ones(len(y)))
        coef = c[1 + acts:]
        fit = {"window_ops": window, "params": float(c[0]),
               "acts": float(c[1]) if acts else 0.0, "update_copies": UPDATE_COPIES if acts else 0,
               "kinds": {k: float(v) for k, v in zip(KINDS, coef)}}
    return fit


def _errors(rows: list[dict[str, Any]], fit: dict[str, Any]) -> list[float]:
    return [(_peak_mb(_unet(r), r["batch"], fit) - r["mb"]) / r["mb"] for r in rows]


def fit_modes(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Per mode, the window and coefficients with the smallest leave-one-config-out error."""
    fits, loo = {}, {}
    for mode in ("sample", *MODES):
        data = [r for r in rows if r["mode"] == mode]
        if not data:
            continue
        best = None
        for window in WINDOWS:
            errs = []
            for held in sorted({r["name"] for r in data}):
                fit = _fit_mode([r for r in data if r["name"] != held], window, mode != "sample")
                errs += _errors([r for r in data if r["name"] == held], fit)
            worst = float(np.max(np.abs(errs)))
            if best is None or worst < best[0]:
                best = (worst, window)
        loo[mode] = best[0]
        fits[mode] = _fit_mode(data, best[1], mode != "sample")
    return fits, loo


def calibrate(configs: dict[str, UNetConfig] | None = None,
              log: Any = print) -> dict[str, Any]:
    """Measure the calibration configs, fit every mode; returns a new :data:`CALIBRATION`."""
    rows = collect(configs or CALIBRATION_CONFIGS, log)
    fits, loo = fit_modes(rows)
    times: dict[str, list[float]] = {"checkpointing": [], "bfloat16": []}
    for name in TIME_CONFIGS:
        cfg = Config(unet=CALIBRATION_CONFIGS[name], train=TrainConfig(batch_size=16))
        base = train_throughput(cfg, steps=5)
        times["checkpointing"].append(base / train_throughput(_variant(cfg, "float32", True), 5))
        times["bfloat16"].append(base / train_throughput(_variant(cfg, "bfloat16", False), 5))
    fp = device_fingerprint()
    return {"fitted_on": {"mlx": fp["mlx"], "backend": fp["backend"], "blas": fp["blas"],
                          "chip": fp["chip"]},
            "fits": fits, "loo_max_error": loo,
            "time": {k: float(np.median(v)) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.device.memory", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the calibration configs and print the fitted table")
    parser.add_argument("--config", help="a config JSON to report on")
    parser.add_argument("--budget-mb", type=float)
    args = parser.parse_args(argv)
    if args.calibrate:
        table = calibrate(log=lambda s: print(s, file=sys.stderr, flush=True))
        print(json.dumps(table, indent=1))
        return 0
    if args.config:
        print(format_report(Config.load(args.config), args.budget_mb))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
