"""Compression with a quality gate: channel pruning, int8/int4 weights and fp16/bf16 casts.

A compressed model is ``(config, recipe, weights)``. The recipe lists the structural steps
applied to ``UNet(config)`` (``prune`` with the kept widths, ``quantize`` with the bit
width, ``cast`` with the dtype), so :func:`build` can rebuild the module tree and a saved
model loads back bit-identical.

:func:`compress` tries the methods in order (prune, quantize, cast) and each method's
levels from mild to aggressive. Each level is applied to the last kept weights and
scored (FID, or any lower-is-better score); it is kept while the score stays within
``max_fid_increase`` of the baseline. The first level that fails is rolled back: the
search continues from the previous weights, bit-identical (checked by digest), and the
method's harsher levels are skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine import measure as protocol
from engine.compression.quant import quantize_model
from engine.config import Config
from engine.device.bench import sampling_latency, sampling_peak_mb
from engine.model.unet import Conv3x3, ResBlock, UNet
from engine.quality.metrics import FeatureExtractor
from engine.training.train import TrainState, make_optimizer, train

__all__ = [
    "DEFAULT_LEVELS",
    "METHODS",
    "CompressionResult",
    "CompressionRow",
    "Evaluate",
    "build",
    "cast_model",
    "compress",
    "digest",
    "fid_evaluator",
    "finetune",
    "format_table",
    "load_compressed",
    "prune_blocks",
    "prune_plan",
    "save_compressed",
    "weights_of",
]

METHODS = ("prune", "quantize", "cast")
DEFAULT_LEVELS: dict[str, tuple[Any, ...]] = {
    "prune": (0.25, 0.5),            # fraction of each block's inner channel groups removed
    "quantize": (8, 4),              # bits per conv/linear weight
    "cast": ("float16", "bfloat16"),  # fp16 keeps more mantissa bits, so it is the milder
}
Evaluate = Callable[[nn.Module], float]
"""Scores a model, lower is better (FID of its samples against real data)."""


# --------------------------------------------------------------------------- pruning

def _blocks(model: nn.Module) -> list[tuple[str, ResBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ResBlock)]


def _inner_conv(conv: Conv3x3) -> nn.Conv2d:
    """The conv whose output channels are the block's inner width."""
    return conv.pointwise if conv.separable else conv.conv


def _group_size(block: ResBlock) -> int:
    """Channels pruned together: one GroupNorm group, so surviving groups keep their stats."""
    norm = block.norm2
    return 1 if norm.num_groups == 1 else norm.dims // norm.num_groups


def prune_plan(model: nn.Module, fraction: float) -> dict[str, list[int]]:
    """The inner channels each ResBlock keeps after removing ``fraction`` of its groups.

    Groups are ranked by the L2 norm of their ``conv1`` filters (Li et al. 2017,
    "Pruning filters for efficient ConvNets"); the weakest are removed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction={fraction!r}: must be in (0, 1)")
    plan = {}
    for name, block in _blocks(model):
        w = _inner_conv(block.conv1).weight.astype(mx.float32)
        norms = np.array(mx.sum(w.reshape(w.shape[0], -1) ** 2, axis=1))
        per = _group_size(block)
        scores = norms.reshape(-1, per).sum(axis=1)
        keep = max(1, round(len(scores) * (1.0 - fraction)))
        groups = np.sort(np.argsort(-scores, kind="stable")[:keep])
        plan[name] = [int(g * per + i) for g in groups for i in range(per)]
    return plan


def prune_blocks(model: nn.Module, plan: Mapping[str, list[int]]) -> None:
    """Keep only the planned inner channels of each ResBlock, in place."""
    blocks = dict(_blocks(model))
    for name, kept in plan.items():
        _prune_block(blocks[name], mx.array(kept))


def _prune_block(block: ResBlock, keep: mx.array) -> None:
    n, per = keep.size, _group_size(block)
    out = _inner_conv(block.conv1)
    out.weight, out.bias = out.weight[keep], out.bias[keep]
    block.temb.weight, block.temb.bias = block.temb.weight[keep], block.temb.bias[keep]
    norm = nn.GroupNorm(1 if block.norm2.num_groups == 1 else n // per, n,
                        pytorch_compatible=True)
    norm.weight, norm.bias = block.norm2.weight[keep], block.norm2.bias[keep]
    block.norm2 = norm
    conv2 = block.conv2
    if conv2.separable:
        dw = conv2.depthwise
        dw.weight, dw.bias, dw.groups = dw.weight[keep], dw.bias[keep], n
        conv2.pointwise.weight = conv2.pointwise.weight[..., keep]
    else:
        conv2.conv.weight = conv2.conv.weight[..., keep]


# --------------------------------------------------------------------------- recipes

def cast_model(model: nn.Module, dtype: str) -> None:
    """Cast every float parameter to ``dtype`` in place (integer codes stay as they are)."""
    target = getattr(mx, dtype)
    model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating)
                          else p, model.parameters()))


def _apply(model: nn.Module, step: Mapping[str, Any]) -> None:
    method = step["method"]
    if method == "prune":
        prune_blocks(model, step["kept"])
    elif method == "quantize":
        quantize_model(model, int(step["level"]))
    elif method == "cast":
        cast_model(model, str(step["level"]))
    else:
        raise ValueError(f"unknown compression method {method!r}; choose from {METHODS}")


def _structure(step: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe step as stored: prune keeps only the kept width of each block."""
    if step["method"] != "prune":
        return dict(step)
    return {**step, "kept": {k: list(range(len(v))) for k, v in step["kept"].items()}}


def build(config: Config, recipe: tuple[Mapping[str, Any], ...]) -> nn.Module:
    """The module tree of ``UNet(config)`` after ``recipe`` (weights to be loaded)."""
    model = UNet(config.unet)
    for step in recipe:
        _apply(model, _structure(step))
    return model


def weights_of(model: nn.Module) -> dict[str, mx.array]:
    """A flat copy of the parameters; later training of ``model`` cannot touch it."""
    flat = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(flat)
    return flat


def _load(config: Config, recipe: tuple, weights: Mapping[str, mx.array]) -> nn.Module:
    model = build(config, recipe)
    expected = dict(tree_flatten(model.parameters()))
    for key, value in expected.items():
        got = weights.get(key)
        if got is None or got.shape != value.shape or got.dtype != value.dtype:
            raise ValueError(f"weights do not match the recipe at {key!r}")
    if set(weights) != set(expected):
        raise ValueError(f"unexpected weights {min(set(weights) - set(expected))!r}")
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    mx.eval(model.parameters())
    return model


def digest(model_or_weights: nn.Module | Mapping[str, mx.array]) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes."""
    flat = (dict(tree_flatten(model_or_weights.parameters()))
            if isinstance(model_or_weights, nn.Module) else model_or_weights)
    h = hashlib.sha256()
    for key in sorted(flat):
        v = flat[key]
        h.update(f"{key}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(np.array(v.reshape(-1).view(mx.uint8)).tobytes())
    return h.hexdigest()


def save_compressed(folder: str | Path, config: Config, recipe: tuple,
                    model: nn.Module) -> Path:
    """Write ``compressed.json`` (config + recipe) and ``model.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    meta = {"format": 1, "config": config.to_dict(), "recipe": [_jsonable(s) for s in recipe]}
    (folder / "compressed.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_compressed(folder: str | Path) -> tuple[Config, tuple, nn.Module]:
    """Rebuild a model written by :func:`save_compressed`; errors name the file."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "compressed.json").read_text())
        config, recipe = Config.from_dict(meta["config"]), tuple(meta["recipe"])
        weights = mx.load(str(folder / "model.safetensors"))
        return config, recipe, _load(config, recipe, weights)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"{folder}: not a loadable compressed model ({err})") from None


def _jsonable(step: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in step.items()}


# --------------------------------------------------------------------------- fine-tune

@dataclass
class _RebuiltState(TrainState):
    """A TrainState whose EMA model has the compressed structure, not ``UNet(config)``."""

    recipe: tuple = ()

    def ema_model(self) -> nn.Module:
        return _load(self.config, self.recipe, dict(tree_flatten(self.ema)))


def finetune(model: nn.Module, config: Config, recipe: tuple, images: np.ndarray,
             val: np.ndarray, steps: int, lr_scale: float = 0.5,
             labels: tuple[np.ndarray, np.ndarray] | None = None) -> nn.Module:
    """Train a compressed model ``steps`` more steps; returns its EMA model.

    ``labels`` are ``(train labels, validation labels)`` for a class-conditional model.
    """
    tc = replace(config.train, steps=steps, warmup_steps=0, eval_every=steps,
                 learning_rate=config.train.learning_rate * lr_scale, checkpointing=False)
    cfg = replace(config, train=tc)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    ema = tree_map(lambda p: mx.array(p), model.parameters())
    state = _RebuiltState(cfg, model, ema, optimizer, recipe=recipe)
    return train(state, images, val, labels=labels).ema_model()


# --------------------------------------------------------------------------- the loop

@dataclass(frozen=True)
class CompressionRow:
    """One measured level. ``fid_change`` is relative to the baseline (0.05 = +5%)."""

    method: str
    level: str
    size_mb: float
    peak_sample_mb: float
    latency_ms: float
    latency_spread: float
    latency_ratio: float  # against the baseline, timed right after it (side by side)
    fid: float
    fid_change: float
    kept: bool
    reason: str
    digest: str


@dataclass(frozen=True)
class CompressionResult:
    """The table, and the recipe and weights of the most compressed model that passed."""

    rows: tuple[CompressionRow, ...]
    config: Config
    recipe: tuple
    weights: Mapping[str, mx.array]
    max_fid_increase: float

    def model(self) -> nn.Module:
        return _load(self.config, self.recipe, self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "recipe": [_jsonable(s) for s in self.recipe],
                "max_fid_increase": self.max_fid_increase}


def fid_evaluator(config: Config, real: np.ndarray, feature_net: FeatureExtractor, n: int = 500,
                  seed: int = 0) -> Evaluate:
    """FID of ``n`` samples against ``n`` real images; fixed seeds, so levels compare paired.

    Args:
        config: the schedule and image shape to sample with.
        real: at least ``2 n`` real images in [-1, 1].
        feature_net: the embedding (:func:`engine.quality.features.feature_network_for`).
    """

    def score(model: nn.Module) -> float:
        return protocol.evaluate(model, config, real, feature_net, n, seed).record.fid

    return score


def _level_name(method: str, level: Any) -> str:
    if method == "prune":
        return f"{round(100 * float(level))}% groups"
    return f"int{level}" if method == "quantize" else str(level)


def _measure(model: nn.Module, config: Config, evaluate: Evaluate, batch: int,
             baseline: nn.Module | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
        size = path.stat().st_size / 2**20
    latency = sampling_latency(model, config, batch=1)
    ratio = 1.0
    if baseline is not None:  # side by side: a shared machine's load drifts between levels
        ratio = latency.median_ms / sampling_latency(baseline, config, batch=1).median_ms
    return {"size_mb": size, "peak_sample_mb": sampling_peak_mb(model, config, batch),
            "latency_ms": latency.median_ms, "latency_spread": latency.spread,
            "latency_ratio": ratio, "fid": float(evaluate(model))}


def _candidate(config: Config, recipe: tuple, weights: Mapping[str, mx.array], method: str,
               level: Any, data: tuple[np.ndarray, ...] | None,
               finetune_steps: int) -> tuple[nn.Module, dict[str, Any]]:
    model = _load(config, recipe, weights)
    step: dict[str, Any] = {"method": method, "level": level}
    if method == "prune":
        step["kept"] = prune_plan(model, float(level))
    _apply(model, step)
    if method == "prune" and data is not None and finetune_steps > 0:
        labels = (data[2], data[3]) if len(data) == 4 else None
        model = finetune(model, config, recipe + (_structure(step),), data[0], data[1],
                         finetune_steps, labels=labels)
    mx.eval(model.parameters())
    return model, _structure(step)


def compress(model: nn.Module, config: Config, evaluate: Evaluate,
             max_fid_increase: float = 0.05,
             levels: Mapping[str, tuple[Any, ...]] = DEFAULT_LEVELS,
             data: tuple[np.ndarray, ...] | None = None, finetune_steps: int = 100,
             memory_batch: int = 1, log: Callable[[str], None] | None = None,
             ) -> CompressionResult:
    """Compress ``model`` as far as the quality gate allows.

    Args:
        model: a trained ``UNet(config)`` (the EMA weights); it is not modified.
        config: its config; the schedule sets the sampler used for latency and memory.
        evaluate: lower-is-better score of a model (FID of its samples), deterministic
            for a given model (fixed seeds), so levels compare paired.
        max_fid_increase: largest accepted relative increase over the baseline score.
        levels: method -> levels from mild to aggressive (default :data:`DEFAULT_LEVELS`).
        data: ``(train_images, val_images)`` (and, for a class-conditional model,
            ``train_labels, val_labels``) for the fine-tune after pruning; without
            it, pruning is scored un-tuned.
        finetune_steps: training steps after each pruning level.
        memory_batch: sampling batch of the peak-memory column.
        log: receives one line per measured level.

    Returns:
        The :class:`CompressionResult`, whose first row is the baseline.
    """
    unknown = set(levels) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown compression method {min(unknown)!r}; choose from {METHODS}")
    recipe: tuple = ()
    weights = weights_of(model)
    base = _measure(model, config, evaluate, memory_batch, None)
    if not math.isfinite(base["fid"]):
        raise ValueError(f"baseline score is {base['fid']}: nothing to compress against")
    rows = [CompressionRow("baseline", "float32", **base, fid_change=0.0, kept=True,
                           reason="reference", digest=digest(weights))]
    for method in (m for m in METHODS if m in levels):
        start = (recipe, weights)  # every level of a method starts from the same weights
        for level in levels[method]:
            before = digest(weights)
            candidate, step = _candidate(config, *start, method, level, data, finetune_steps)
            m = _measure(candidate, config, evaluate, memory_batch, model)
            change = (m["fid"] - base["fid"]) / base["fid"]
            ok = math.isfinite(change) and change <= max_fid_increase
            if ok:
                recipe, weights = start[0] + (step,), weights_of(candidate)
            elif digest(weights) != before:
                raise RuntimeError("rollback failed: the kept weights changed")  # invariant
            reason = (f"FID {change:+.1%} {'<=' if ok else '>'} {max_fid_increase:+.1%}"
                      + ("" if ok else "; rolled back to the previous weights"))
            row = CompressionRow(method, _level_name(method, level), **m, fid_change=change,
                                 kept=ok, reason=reason, digest=digest(weights))
            rows.append(row)
            if log is not None:
                log(format_row(row))
            if not ok:
                break
    return CompressionResult(tuple(rows), config, recipe, weights, max_fid_increase)


HEADER = (f"{'method':<9} {'level':<11} {'size MB':>8} {'peak MB':>8} {'latency ms':>11} "
          f"{'vs base':>8} {'FID':>8} {'dFID':>8}  result")


def format_row(r: CompressionRow) -> str:
    status = "kept" if r.kept else "rolled back"
    return (f"{r.method:<9} {r.level:<11} {r.size_mb:8.3f} {r.peak_sample_mb:8.2f} "
            f"{r.latency_ms:11.2f} {r.latency_ratio:7.2f}x {r.fid:8.3f} {r.fid_change:+8.1%}  "
            f"{status}")


def format_table(result: CompressionResult) -> str:
    """The compression table as fixed-width text."""
    return "\n".join([HEADER, *(format_row(r) for r in result.rows)])
