"""Train one config end to end and write what a user keeps: checkpoint, samples, metrics.

``run(config, dataset, out)`` is what ``diffnas train`` calls; a notebook can call it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import Config
from engine.data.datasets import Dataset, labels_of
from engine.data.images import save_grid
from engine.device.bench import device_fingerprint
from engine.io.checkpoint import save_checkpoint
from engine.measure import measure, sample_images
from engine.model.unet import UNet
from engine.quality.features import feature_network_for
from engine.quality.metrics import check_real_count
from engine.training.train import Callback, EvalPoint, init_state, train

GRID_IMAGES = 64


@dataclass(frozen=True)
class QualityEval:
    """Settings of the FID/KID evaluation: sample count and seed."""

    n: int = 1000
    seed: int = 0


def evaluation(model: UNet, config: Config, dataset: Dataset, settings: QualityEval,
               cache_dir: Path | None = None) -> dict[str, Any]:
    """``model`` measured by the protocol (:func:`engine.measure.measure`), as flat metrics.

    Returns:
        FID, KID, precision and recall with the real-vs-real floors, batch-1 sampling
        latency and its spread, and peak memory for training and sampling.
    """
    net = feature_network_for(dataset, cache_dir or Path("results") / "feature-nets")
    measured = measure(model, config, dataset.images, net, settings.n, settings.seed)
    cost = measured.cost
    return {**measured.quality.to_dict(), "latency_ms": cost.latency.median_ms,
            "latency_spread": cost.latency.spread, "peak_train_mb": cost.memory.train_mb,
            "peak_sample_mb": cost.memory.sample_mb}


def progress_printer(total: int, emit: Callable[[str], None] = print) -> Callback:
    """A training callback that prints step, losses, speed and ETA."""

    def report(point: EvalPoint) -> None:
        rate = point.step / max(point.elapsed_s, 1e-9)
        eta = (total - point.step) / rate if rate > 0 else float("nan")
        emit(f"step {point.step}/{total}  train {point.train_loss:.4f}  val {point.val_loss:.4f}"
             f"  {rate:.1f} it/s  ETA {eta:.0f}s")

    return report


def run(config: Config, dataset: Dataset, out: Path, settings: QualityEval = QualityEval(),
        emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``config`` on ``dataset`` and write checkpoint, samples.png, metrics.json, config.json.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        ValueError: ``dataset`` holds fewer than twice ``settings.n`` images (before
            anything is written).
    """
    check_real_count(settings.n, len(dataset), "QualityEval.n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    train_set, val_set = dataset.split(0.1, config.train.seed)
    start = time.perf_counter()
    state = train(init_state(config), train_set.images, val_set.images,
                  callback=progress_printer(config.train.steps, emit),
                  labels=labels_of(train_set, val_set))
    train_s = time.perf_counter() - start
    save_checkpoint(state, out / "checkpoint")
    model = state.ema_model()
    save_grid(sample_images(model, config, GRID_IMAGES, settings.seed), out / "samples.png")
    emit("evaluating: FID/KID, latency, memory")
    metrics = {"train_seconds": train_s, "steps": state.step,
               "final_val_loss": state.history[-1].val_loss if state.history else None,
               **evaluation(model, config, dataset, settings),
               "device": device_fingerprint()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
