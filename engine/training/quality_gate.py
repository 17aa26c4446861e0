"""What a distillation gate scores: FID/KID of a model's samples, or a cheap proxy for tests.

Samples are drawn as the trial protocol draws them (:func:`engine.measure.draw`), so a
student's FID is comparable with its teacher's trial FID at the same count and seed.

A quality function samples a model at a schedule and returns its FID (lower is better),
or a mapping with ``fid`` and ``kid``; :class:`engine.training.stages.Gate` compares it
with the baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from mlx import nn

from engine.config import ScheduleConfig
from engine.data.datasets import Dataset
from engine.measure import draw
from engine.quality.features import feature_network_for
from engine.quality.metrics import evaluate_quality

__all__ = ["Quality", "QualityFn", "fid_quality", "sample_error_quality"]

Quality = float | Mapping[str, float]
QualityFn = Callable[[nn.Module, ScheduleConfig], Quality]
"""``quality(model, schedule) -> fid`` (lower is better), or a mapping with ``fid`` and ``kid``."""


def fid_quality(dataset: Dataset, n: int = 1000, seed: int = 0,
                cache_dir: Path | None = None) -> QualityFn:
    """FID and KID of ``n`` samples (at most half the dataset) on its feature network."""
    n = min(n, len(dataset) // 2)  # the real-vs-real floor needs two disjoint real sets of n
    net = feature_network_for(dataset, cache_dir or Path("results") / "feature-nets")

    def quality(model: nn.Module, schedule: ScheduleConfig) -> dict[str, float]:
        fake = draw(model, schedule, n, seed, dataset.image_size, dataset.channels)
        if not np.isfinite(fake).all():
            return {"fid": math.inf, "kid": math.inf}  # a diverged student fails its gate
        record = evaluate_quality(fake, dataset.images, net, n, seed)
        return {"fid": float(record.fid), "kid": float(record.kid)}

    return quality


def sample_error_quality(reference: np.ndarray, seed: int) -> QualityFn:
    """A cheap stand-in for FID: mean squared error to ``reference`` from the same noise.

    ``reference`` is ``generate(teacher, fine_schedule, n, seed, ...)``, e.g. the teacher's
    DDIM at 2N steps; every model is sampled from that same noise (seed).
    """
    n, size, _, channels = reference.shape

    def quality(model: nn.Module, schedule: ScheduleConfig) -> float:
        fake = draw(model, schedule, n, seed, size, channels)
        return float(np.mean((fake - reference) ** 2))

    return quality
