"""Fewer sampling steps for a trained checkpoint: what ``diffnas distill`` calls.

Progressive distillation (Salimans & Ho 2022) lives in :mod:`engine.training.progressive`,
consistency distillation (Song et al. 2023) in :mod:`engine.training.consistency`; both
are gated and rolled back by :mod:`engine.training.stages`. A stage checkpoint loads
back with :func:`engine.io.models.load_distilled`.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.data.datasets import Dataset
from engine.io.checkpoint import load_weights
from engine.training.consistency import ConsistencyConfig, consistency_distill
from engine.training.progressive import ProgressiveConfig, progressive_distill
from engine.training.quality_gate import QualityFn, fid_quality
from engine.training.stages import DistillResult, Emit, Gate

__all__ = ["METHODS", "distill"]

METHODS = ("progressive", "consistency")


def distill(checkpoint: str | Path, method: str, steps: int, dataset: Dataset, out: str | Path,
            gate: Gate | None = None, teacher_steps: int = 64, quality: QualityFn | None = None,
            train_steps: int | None = None, batch_size: int | None = None,
            reparam_steps: int | None = None, emit: Emit = print) -> DistillResult:
    """Distil a trained checkpoint to ``steps`` sampling steps; what ``diffnas distill`` calls.

    Writes the stage checkpoints and ``result.json`` (the stage table) under ``out``.
    ``train_steps``, ``batch_size`` and ``reparam_steps`` (the eps -> v conversion of an
    eps-prediction teacher) override the method's defaults when given.

    Args:
        checkpoint: the teacher's training checkpoint folder.
        method: ``progressive`` or ``consistency``.
        steps: the sampling step count to reach.
        dataset: training images and, by default, the FID reference.
        out: folder for the stage checkpoints and ``result.json``.
        gate: the per-stage quality gate (default :class:`Gate`).
        teacher_steps: the teacher's DDIM step count (stage 0).
        quality: scores a model at a schedule (default: :func:`fid_quality` of ``dataset``).
        emit: receives the progress lines.

    Returns:
        The distillation result (last passing stage and every attempt's record).

    Raises:
        ValueError: an unknown method, a bad step count, or a dataset that does not match
            the checkpoint's image size or channels.
        engine.io.checkpoint.CheckpointError: the checkpoint is missing, corrupt or mismatched.
    """
    gate = gate or Gate()
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    config, teacher = load_weights(checkpoint)
    u = config.unet
    if (dataset.image_size, dataset.channels) != (u.image_size, u.channels):
        raise ValueError(f"dataset {dataset.name!r} has {dataset.image_size} px x {dataset.channels} "
                         f"channels; the checkpoint expects {u.image_size} px x {u.channels}")
    labels = None
    if u.num_classes > 0:
        if dataset.labels is None:
            raise ValueError(f"dataset {dataset.name!r} has no labels; the checkpoint is "
                             f"conditioned on {u.num_classes} classes")
        labels = dataset.labels
    quality = quality or fid_quality(dataset)
    overrides = {k: v for k, v in (("train_steps", train_steps), ("batch_size", batch_size),
                                   ("reparam_steps", reparam_steps)) if v is not None}
    if method == "progressive":
        settings = ProgressiveConfig(teacher_steps=teacher_steps, target_steps=steps, **overrides)
        result = progressive_distill(teacher, config, dataset.images, out, quality, settings, gate,
                                     emit=emit, labels=labels)
    else:
        cd = ConsistencyConfig(teacher_steps=teacher_steps, target_steps=steps, **overrides)
        result = consistency_distill(teacher, config, dataset.images, out, quality, cd, gate,
                                     emit=emit, labels=labels)
    (Path(out) / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
