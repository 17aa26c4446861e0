"""Derived points: a trial's model after distillation, compression or a tuned timestep
schedule, measured like a trial and recorded so that it joins the Pareto front.

``diffnas distill``, ``diffnas compress`` and ``diffnas schedule`` call :func:`source` to
find a trial's model, change it with the engine, then :func:`measure` and :func:`record`
the result. Trial labels are the trial number (``3``) or, for a derived point, ``d``
and its number (``d0``), so derived points can be derived from again (distil, then
compress).

Derived points are stored in a companion study, ``<study>-derived``, in the same
storage, not in the study itself. A study's sampler learns from every COMPLETE trial
in it, and a derived point carries its source's parameters with values those
parameters did not produce: its quality comes from extra training or a tuned schedule.
Stored next to the search's trials, a 4-step distilled student would teach TPE that 4
DDIM steps give the teacher's FID. ``diffnas pareto`` and ``diffnas status`` read both
studies, so the front and the reports show every point.

The measurement follows the trial protocol (``workers/trial.py``): FID/KID on the
space's ``fid_samples`` with its seed against the same dataset and feature network,
peak sampling memory at batch 1, and batch-1 sampling latency. The latency is measured
here, side by side with the source model, and reported as the source trial's recorded
latency times that ratio, so that a point measured on this machine stays comparable
with trials measured on the workers; peak sampling memory likewise, as the source's
recorded peak plus the difference of the two peaks measured here. The raw numbers are
kept with the point.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlx import nn
from optuna.trial import FrozenTrial, TrialState

from engine.config import Config
from engine.data.datasets import Dataset, load_dataset
from engine.data.images import grid_png
from engine.device.bench import device_fingerprint
from engine.io.models import load_model
from engine.measure import MemoryResult, evaluate, sampling_memory, side_by_side
from engine.model.cost import flops, param_count
from engine.quality.features import feature_network_for
from search.pruning.base import constraint_values
from search.space import SearchSpace
from search.storage import record as rec
from search.storage import study as st
from search.storage.artifacts import write_trial
from workers.records import OBJECTIVES

SUFFIX = "-derived"
KINDS = ("distill", "compress", "schedule")
ROUNDS = 3  # side-by-side latency rounds (the best median of each model is kept)


def companion_name(name: str) -> str:
    return name + SUFFIX


def companion(study: optuna.Study, create: bool = False) -> optuna.Study | None:
    """The study holding ``study``'s derived points; ``None`` if it has none yet."""
    name = companion_name(study.study_name)
    storage = study._storage
    if name in st.study_names(storage):
        return st.load_existing(storage, name)
    if not create:
        return None
    derived = optuna.create_study(storage=storage, study_name=name,
                                  directions=["minimize"] * len(OBJECTIVES))
    derived.set_user_attr("derived_from", study.study_name)
    return derived


@dataclass(frozen=True)
class Source:
    """A trial whose model can be derived from: where its model is, and its study's space."""

    study: optuna.Study  # the search study (never the companion)
    label: str  # "3" or "d0"
    trial: FrozenTrial
    space: SearchSpace
    folder: Path  # the model folder (engine.io.models.load_model reads it)

    @property
    def latency_ms(self) -> float:
        return float(self.trial.values[OBJECTIVES.index("latency_ms")])


def source(study: optuna.Study, label: str) -> Source:
    """The COMPLETE trial ``label`` (``"3"``, or ``"d0"`` for a derived point) and its model.

    Raises:
        StudyError: a malformed label, no such trial, not COMPLETE, or its files are gone.
    """
    match = re.fullmatch(r"(d?)(\d+)", label.strip())
    if match is None:
        raise st.StudyError(f"trial {label!r}: give a trial number (3) or a derived point (d0)")
    derived, number = bool(match.group(1)), int(match.group(2))
    holder = companion(study) if derived else study
    trials = {t.number: t for t in holder.get_trials(deepcopy=False)} if holder else {}
    if number not in trials:
        raise st.StudyError(f"study {study.study_name!r} has no {'derived point' if derived else 'trial'} "
                            f"{label}")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE or not trial.values:
        raise st.StudyError(f"trial {label} is {trial.state.name}, not COMPLETE: it has no model")
    folder = _model_folder(trial, label)
    return Source(study, label, trial, st.stored_space(study), folder)


def _model_folder(trial: FrozenTrial, label: str) -> Path:
    paths = dict(rec.read(trial).finished.artifacts or {})
    marker = next((p for rel, p in paths.items() if Path(rel).name in
                   ("config.json", "compressed.json")), None)
    if marker is None:
        raise st.StudyError(f"trial {label} has no model among its artifacts")
    if not Path(marker).is_file():
        raise st.StudyError(f"trial {label}: model file missing: {marker}")
    return Path(marker).parent


def dataset_of(space: SearchSpace) -> Any:
    """The study's dataset at its image size (errors name a missing or corrupt one)."""

    return load_dataset(space.data.dataset, image_size=space.data.image_size)


# -- measure -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """A derived model measured by the trial protocol; ``values`` in :data:`OBJECTIVES` order."""

    values: tuple[float, ...]
    quality: dict[str, Any]
    measurement: dict[str, Any]
    device: dict[str, Any]
    grid: np.ndarray  # (grid_images, H, W, C): the first samples, for samples.png


def measure(model: nn.Module, config: Config, src: Source, dataset: Dataset,
            cache_dir: Path) -> Point:
    """FID/KID, side-by-side latency against the source, and peak memory of ``model``.

    Quality and latency are taken by :mod:`engine.measure`, the protocol a trial follows.
    """

    ev = src.space.evaluate
    net = feature_network_for(dataset, cache_dir)
    quality = evaluate(model, config, dataset.images, net, ev.fid_samples, ev.seed,
                       ev.grid_images)
    source_config, source_model = load_model(src.folder)
    here, source_here = side_by_side(model, config, source_model, source_config,
                                     ev.latency_runs, ROUNDS, ev.latency_rounds)
    latency = src.latency_ms * here / source_here
    # Peak memory counts every live array, and this process holds more than a trial's does
    # (both models, the feature network): the difference of the two peaks, measured here
    # side by side, is added to the source's recorded peak.
    mb_here = sampling_memory(model, config)
    source_mb_here = sampling_memory(source_model, source_config)
    recorded = rec.read(src.trial).measured
    sample_mb = max((recorded.sample_mb if recorded else source_mb_here) + mb_here
                    - source_mb_here, 0.0)
    train_mb = recorded.train_mb if recorded else sample_mb
    memory = MemoryResult(train_mb, sample_mb).objective(ev.memory)
    measurement = {"latency_ms": latency, "latency_here_ms": here,
                   "source_latency_here_ms": source_here, "latency_ratio": here / source_here,
                   "source_latency_ms": src.latency_ms, "sample_mb": sample_mb,
                   "sample_mb_here": mb_here, "source_sample_mb_here": source_mb_here,
                   "train_mb": train_mb}
    return Point((float(quality.record.fid), float(latency), float(memory)), quality.to_dict(),
                 measurement, device_fingerprint(), quality.grid)


# -- record ------------------------------------------------------------------------------


def record(src: Source, kind: str, config: Any, point: Point, model_folder: Path,
           detail: dict[str, Any], results: Path) -> str:
    """Store ``point`` as a COMPLETE trial of the companion study; returns its label (``dN``).

    The model folder is copied under ``results/<study>/derived/`` first, so a point is
    never recorded without its files.
    """

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = results / src.study.study_name / "derived" / f"{kind}-of-{src.label}-{stamp}"
    files = {f"model/{p.name}": p.read_bytes() for p in sorted(model_folder.iterdir())
             if p.is_file()}
    files["samples.png"] = grid_png(point.grid)
    paths = write_trial(folder, files)
    cost = _cost(config)
    finished = rec.Finished(quality=point.quality, device=point.device, artifacts=paths,
                            worker="local")
    frozen = optuna.trial.create_trial(
        params=dict(src.trial.params), distributions=dict(src.trial.distributions),
        values=list(point.values),
        user_attrs={**rec.attrs(config, rec.Prescreen(cost["params"], cost["flops"]),
                                rec.Measured.from_doc(point.measurement), finished,
                                rec.Derived(kind, src.label, detail),
                                rec.headline(point.values, finished, None))})
    limits = src.space.constraints.limits()
    if limits:
        known = {"params": float(cost["params"]), "flops": float(cost["flops"]),
                 "latency_ms": point.values[1], "memory_mb": point.values[2]}
        for name, value in constraint_values(known, limits).items():
            frozen.set_constraint(name, value)
    holder = companion(src.study, create=True)
    assert holder is not None
    holder.add_trial(frozen)
    number = max(t.number for t in holder.get_trials(deepcopy=False)
                 if rec.read(t).finished.artifacts == paths)
    return f"d{number}"


def _cost(config: Config) -> dict[str, int]:
    return {"params": param_count(config.unet), "flops": flops(config.unet)}


def summary(trial: FrozenTrial) -> str:
    """``progressive 4 steps of 3``-style description of a derived point ('' otherwise)."""
    derived = rec.read(trial).derived
    return derived.summary() if derived is not None else ""
