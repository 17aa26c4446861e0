"""The analytic memory model: a candidate's peak predicted from its layer sizes.

Why a window. MLX evaluates a graph asynchronously: the main thread allocates each op's
output and queues the op; buffers are freed only as the compute thread retires ops. The
main thread runs up to a few hundred ops ahead, so the peak is not one layer's working
set but the sum over a window of consecutive ops (on the 2-core CPU a chain of 1 MB
element-wise ops held ~200 MB live). How many ops a layer queues depends on how it runs
(:mod:`engine.model.conv`): a same-size 3x3 conv with enough padded-grid rows and a thin
padding ring (:func:`engine.model.conv.shifted_forward`: ``batch * (res + 2)^2 >= 1024``
and, for a square map, ``res >= 15``) is k*k shifted GEMMs, 54 ops and no im2col copy;
otherwise (small batches, deep levels, 8 px maps) it is ``mx.conv2d``, a few ops and an
im2col copy. So the sizes and windows below depend on the batch.

The model, per mode (sampling; training in float32 or bf16/fp16, with or without
checkpointing), in MB::

    peak = max(4 c_update P,
               floor + 4 (c_P P + B (c_act acts + max_i sum_{j in window(i)} c . size_B(j))))

``P`` is the parameter count, ``floor`` a per-call constant (buffers of the sampler and the
update that do not scale with the network). ``size_B(j)`` holds layer ``j``'s per-image
elements by kind from :func:`engine.model.cost.layers`, at batch ``B``: im2col of a dense
conv on the ``mx.conv2d`` path (``col``), the padded input and output rows of a conv on
the shifted-GEMM path (``rows``), output, depthwise im2col, norm, per-position linears,
attention scores ``L^2 * heads``. ``acts`` sums every layer's output (what backward
keeps); ``window(i)`` is the layers from ``i`` whose op count (``_OPS``) fits in the fitted
window. ``c_update = 7`` copies of the parameters coexist during the AdamW and EMA updates.
The other ``c`` and ``floor`` are non-negative least-squares fits of relative error
against ``mx.get_peak_memory`` (:mod:`engine.device.memory.fit`), stored in
``calibration.json`` beside this file (:data:`CALIBRATION`)::

    uv run python benchmarks/memory_calibrate.py --write   # ~35 min on 2 shared CPU cores

The coefficients were fitted on MLX 0.32.4, CPU backend, OpenBLAS, Linux x86-64
(``CALIBRATION["fitted_on"]``); on another backend (Metal, CUDA) re-run it. Its
``time`` entry is the step time relative to float32 without checkpointing (medians over
4 configs, batch 16); ``loo_max_error`` the worst leave-one-config-out relative error of
each mode. Held-out accuracy: ``benchmarks/memory_accuracy.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import Config, UNetConfig
from engine.model.conv import shifted_forward
from engine.model.cost import Layer, layers, param_count
from engine.training.train import VAL_BATCH

MB = 2**20
KINDS = ("col", "rows", "out", "dwcol", "norm", "act", "lin", "score")
# Graph nodes MLX queues per layer (counted with mx.export_to_dot on the U-Net's modules):
# a GroupNorm is 6 (two sums that keep their axis) plus its activation (SiLU, a custom
# function, 6; GELU and ReLU one fused op); a same-size conv on the shifted-GEMM path 54 (its k*k tap slices and GEMMs), on the
# mx.conv2d path (few rows, strided) 5 (conv, custom-VJP wrapper, bias-add).
_OPS = {"conv": 5, "convT": 3, "dwconv": 3, "norm": 6, "linear": 5, "attention": 14}
_GEMM_OPS = 54
_ACTIVATION_OPS = {"silu": 6, "gelu": 1, "relu": 1}
# Arrays of the activation's size its forward allocates: SiLU's rational tanh is 4 (the
# clipped input, x^2, numerator, result), GELU and ReLU one fused op.
_ACTIVATION_ARRAYS = {"silu": 4, "gelu": 1, "relu": 1}
STATE_COPIES = {"weights": 1, "optimizer": 2, "ema": 1}  # float32 copies of the parameters
# Peak of the update phase in parameter copies: weights, gradients, AdamW m and v, EMA,
# plus the new weights, m and v before the old ones are freed (7 measured: 6.9).
UPDATE_COPIES = 7
# The training modes that have their own fit: name -> (dtype, checkpointing).
MODES = {"float32": ("float32", False), "float32+ckpt": ("float32", True),
         "low": ("bfloat16", False), "low+ckpt": ("bfloat16", True)}

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
CALIBRATION: dict[str, Any] = json.loads(CALIBRATION_FILE.read_text())


# --------------------------------------------------------------------------- sizes

def _kernel(layer: Layer) -> int:
    groups = layer.cin if layer.kind == "dwconv" else 1
    return round(((layer.params - layer.cout) / ((layer.cin // groups) * layer.cout)) ** 0.5)


def _shifted_gemm(layer: Layer, batch: int) -> bool:
    """Whether :func:`engine.model.conv.conv2d` runs ``layer`` as shifted GEMMs at ``batch``."""
    strided = layer.name.endswith("downsample")  # the only stride-2 conv of the U-Net
    return (layer.kind == "conv" and not strided and _kernel(layer) == 3
            and shifted_forward(batch, layer.resolution, layer.resolution))


def _ops(layer: Layer, batch: int, activation: str) -> int:
    if _shifted_gemm(layer, batch):
        return _GEMM_OPS
    return _OPS[layer.kind] + (_ACTIVATION_OPS[activation] if layer.kind == "norm" else 0)


def _sizes(layer: Layer, u: UNetConfig, batch: int) -> dict[str, int]:
    """Elements per image of each size kind for one layer, run at ``batch``."""
    s = dict.fromkeys(KINDS, 0)
    pixels = layer.out_elems // max(layer.cout, 1)
    if layer.kind == "convT":  # MLX's CPU transposed conv loops without an im2col copy
        s["out"] = layer.out_elems
    elif layer.kind == "conv":
        k = _kernel(layer)
        if _shifted_gemm(layer, batch):  # padded input and output rows, no im2col
            s["rows"] = (layer.resolution + 2) ** 2 * (layer.cin + layer.cout)
        elif k > 1:
            s["col"] = pixels * k * k * layer.cin
        s["out"] = layer.out_elems
    elif layer.kind == "dwconv":
        s["dwcol"], s["out"] = 9 * layer.out_elems, layer.out_elems
    elif layer.kind == "norm":
        s["norm"] = layer.out_elems
        if not layer.name.endswith(".norm"):  # every norm but attention's feeds an activation
            s["act"] = _ACTIVATION_ARRAYS[u.activation] * layer.out_elems
    elif layer.kind == "linear" and layer.out_elems != layer.cout:  # per-position linears
        s["lin"] = layer.out_elems
    elif layer.kind == "attention":
        positions = layer.resolution**2
        s["score"] = positions * positions * (layer.cin // u.head_dim)
        s["lin"] = layer.out_elems
    return s


@dataclass(frozen=True)
class Analytic:
    """The sizes the model weighs, for one U-Net, batch and window length."""

    params: int
    acts: int                 # sum of per-position outputs, per image
    windows: np.ndarray       # (layers, kinds): size sums over each op window, per image


@lru_cache(maxsize=4096)  # the calibration fit asks for the same few hundred many times
def analytic(u: UNetConfig, window_ops: int, batch: int) -> Analytic:
    """Parameter count, kept activations and per-window sizes of ``u`` at ``batch`` (no MLX run)."""
    ls = layers(u)
    sizes = np.array([[_sizes(layer, u, batch)[k] for k in KINDS] for layer in ls],
                     float)
    ops = np.cumsum([0] + [_ops(layer, batch, u.activation) for layer in ls])
    cum = np.vstack([np.zeros(len(KINDS)), np.cumsum(sizes, axis=0)])
    ends = np.maximum(np.searchsorted(ops, ops[:-1] + window_ops, side="right") - 1,
                      np.arange(1, len(ls) + 1))
    windows = cum[ends] - cum[:-1]
    acts = sum(layer.out_elems for layer in ls if layer.out_elems != layer.cout
               or layer.kind != "linear")
    return Analytic(param_count(u), int(acts), windows)


def _mode(dtype: str, checkpointing: bool) -> str:
    return ("float32" if dtype == "float32" else "low") + ("+ckpt" if checkpointing else "")


def peak_mb(u: UNetConfig, batch: int, fit: dict[str, Any]) -> float:
    """The module docstring's ``peak`` in MB for one fit (a ``CALIBRATION["fits"]`` entry)."""
    a = analytic(u, int(fit["window_ops"]), batch)
    coef = np.array([fit["kinds"][k] for k in KINDS])
    per_image = fit.get("acts", 0.0) * a.acts + float(np.max(a.windows @ coef))
    # During the AdamW and EMA updates old and new copies of the state coexist.
    update = fit.get("update_copies", 0) * a.params
    return max(4 * update / MB,
               fit.get("floor_mb", 0.0) + 4 * (fit["params"] * a.params + batch * per_image) / MB)


def training_variant(config: Config, dtype: str, checkpointing: bool) -> Config:
    """``config`` trained in ``dtype``, with or without per-block checkpointing."""
    return replace(config, train=replace(config.train, dtype=dtype, checkpointing=checkpointing))


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

    Returns:
        The predicted peaks and state sizes.
    """
    u, t = config.unet, config.train
    batch = batch or t.batch_size
    val_batch = val_batch or min(VAL_BATCH, t.batch_size)
    fits = CALIBRATION["fits"]
    p_mb = 4 * param_count(u) / MB
    step = peak_mb(u, batch, fits[_mode(t.dtype, t.checkpointing)])
    sample = fits["sample"]
    # Validation: the training state stays resident, plus the EMA model it evaluates.
    resident = (sum(STATE_COPIES.values()) + 1) * p_mb
    validation = resident + peak_mb(u, val_batch, {**sample, "params": 0.0})
    return MemoryProfile(
        batch=batch, dtype=t.dtype, checkpointing=t.checkpointing, params=param_count(u),
        weights_mb=p_mb, optimizer_mb=STATE_COPIES["optimizer"] * p_mb,
        ema_mb=STATE_COPIES["ema"] * p_mb, train_step_mb=step, val_batch=val_batch,
        validation_mb=validation, train_peak_mb=max(step, validation),
        sample_b1_mb=peak_mb(u, config.passes, sample), sample_n=sample_n,
        sample_bn_mb=peak_mb(u, sample_n * config.passes, sample))
