"""Derive a new Pareto point from a study trial: distill, compress, or tune its schedule.

Each operation loads the trial's model (:func:`search.derived.points.source`), changes it with the
engine, measures it by the trial protocol and records it in the study's companion
(:mod:`search.derived.points`); ``diffnas pareto NAME`` then shows it on the front. An operation
whose every distillation stage or compression level failed its gate records nothing and
returns ``None`` for the label.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.compression.compress import (
    DEFAULT_LEVELS,
    compress,
    fid_evaluator,
    format_table,
    save_compressed,
)
from engine.data.datasets import labels_of
from engine.io.checkpoint import load_weights
from engine.io.models import kind_of, load_model
from engine.quality.features import feature_network_for
from engine.sampling.diffusion import denoiser
from engine.sampling.timesteps import optimize_schedule
from engine.training.distill import distill
from engine.training.quality_gate import fid_quality
from engine.training.stages import Gate
from search.derived import points as dv
from search.report import front
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES


def _report(label: str, src: dv.Source, point: dv.Point) -> None:
    before = ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, src.trial.values))
    after = ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, point.values))
    m = point.measurement
    print(f"recorded {label} in {dv.companion_name(src.study.study_name)}: {after}\n"
          f"  source trial {src.label}: {before}\n"
          f"  latency here {m['latency_here_ms']:.2f} ms vs the source's "
          f"{m['source_latency_here_ms']:.2f} ms side by side (x{m['latency_ratio']:.3f})\n"
          f"  see it with: diffnas pareto {src.study.study_name}")


# -- distill ---------------------------------------------------------------------------


def distill_trial(src: dv.Source, method: str, steps: int, results: Path,
                  teacher_steps: int = 64, max_fid_ratio: float = 1.10, retries: int = 2,
                  train_steps: int | None = None, batch_size: int | None = None,
                  emit: Any = print) -> tuple[str | None, Any]:
    """Distil ``src``'s model to ``steps`` steps and record the last stage that passed.

    Returns:
        ``(label, result)``: the new point's label (``None`` if no stage passed) and the
        :class:`engine.training.stages.DistillResult`.
    """
    if kind_of(src.folder) != "checkpoint":
        raise ValueError(f"trial {src.label} is a {kind_of(src.folder)} model; distil a trained "
                         "trial (its source) instead")
    dataset = dv.dataset_of(src.space)
    ev = src.space.evaluate
    cache = results / "feature-nets"
    quality = fid_quality(dataset, ev.fid_samples, ev.seed, cache)
    gate = Gate(max_fid_ratio=max_fid_ratio, max_retries=retries)
    with tempfile.TemporaryDirectory(dir=_work(results)) as work:
        result = distill(src.folder, method, steps, dataset, Path(work), gate, teacher_steps,
                         quality, train_steps=train_steps, batch_size=batch_size, emit=emit)
        emit(result.table())
        if result.final_stage == 0:
            return None, result
        config, model = load_model(result.checkpoint)
        point = dv.measure(model, config, src, dataset, cache)
        final = result.final
        detail = {"what": f"{method} {final.steps} steps", "method": method,
                  "steps": final.steps, "requested_steps": steps,
                  "teacher_steps": teacher_steps, "rolled_back": result.rolled_back,
                  "gate": {"max_fid_ratio": max_fid_ratio, "retries": retries},
                  "stages": result.to_dict()["stages"]}
        label = dv.record(src, "distill", config, point, result.checkpoint, detail, results)
    _report(label, src, point)
    return label, result


def _steps(trial: Any) -> int:
    config = rec.read(trial).config
    return config.schedule.steps if config is not None else 0


def distill_front(study: Any, k: int, method: str, steps: int, results: Path,
                  **options: Any) -> list[tuple[str, str | None]]:
    """Distil the ``k`` non-dominated search trials of lowest FID (``search --distill-front``).

    Trials already sampling in ``steps`` or fewer are skipped. Returns ``(source, new
    label or None)`` per distilled trial; a trial whose every stage failed records nothing.
    """

    result = front(study, st.stored_space(study))
    order = np.argsort(result.points[:, 0])
    chosen = [result.labels[i] for i in order if result.on_front[i]
              and not result.labels[i].startswith("d")
              and _steps(result.trials[i]) > steps][:k]
    done = []
    for label in chosen:
        print(f"distilling trial {label} ({method}, {steps} steps)", flush=True)
        new, _ = distill_trial(dv.source(study, label), method, steps, results, **options)
        done.append((label, new))
    return done


# -- compress --------------------------------------------------------------------------


def compress_trial(src: dv.Source, max_fid_increase: float, results: Path,
                   methods: tuple[str, ...] | None = None, finetune_steps: int = 100,
                   emit: Any = print) -> tuple[str | None, Any]:
    """Compress ``src``'s model as far as ``max_fid_increase`` allows; record what was kept."""
    if kind_of(src.folder) == "compressed":
        raise ValueError(f"trial {src.label} is already compressed; compress its source instead")
    config, model = load_model(src.folder)
    if model.__class__.__name__ != "UNet":
        raise ValueError(f"trial {src.label}'s model is a {type(model).__name__}; only U-Nets "
                         "compress")
    dataset = dv.dataset_of(src.space)
    ev = src.space.evaluate
    cache = results / "feature-nets"
    n = min(ev.fid_samples, len(dataset) // 2)
    evaluate = fid_evaluator(config, dataset.images, feature_network_for(dataset, cache), n,
                             ev.seed)
    levels = {m: DEFAULT_LEVELS[m] for m in (methods or tuple(DEFAULT_LEVELS))}
    train, val = dataset.split(src.space.data.val_fraction, src.space.data.split_seed)
    result = compress(model, config, evaluate, max_fid_increase, levels,
                      (train.images, val.images, *(labels_of(train, val) or ())),
                      finetune_steps, log=emit)
    emit(format_table(result))
    if not result.recipe:
        return None, result
    compressed = result.model()
    with tempfile.TemporaryDirectory(dir=_work(results)) as work:
        folder = save_compressed(Path(work) / "model", config, result.recipe, compressed)
        point = dv.measure(compressed, config, src, dataset, cache)
        kept = [r for r in result.rows if r.kept and r.method != "baseline"]
        recipe = " + ".join(f"{step['method']} {step['level']}" for step in result.recipe)
        detail = {"what": f"compressed: {recipe}",
                  "max_fid_increase": max_fid_increase, "size_mb": kept[-1].size_mb,
                  "baseline_size_mb": result.rows[0].size_mb, **result.to_dict()}
        label = dv.record(src, "compress", config, point, folder, detail, results)
    _report(label, src, point)
    return label, result


# -- schedule --------------------------------------------------------------------------


def schedule_trial(src: dv.Source, steps: int, results: Path, sampler: str | None = None,
                   seconds: float = 60.0, seed: int = 0, batch: int = 64,
                   emit: Any = print) -> str:
    """Optimise ``steps`` sampling times for ``src``'s model; record it with that schedule."""
    if kind_of(src.folder) != "checkpoint":
        raise ValueError(f"trial {src.label} is a {kind_of(src.folder)} model; tune the "
                         "schedule of a trained trial")
    config, model = load_weights(src.folder)
    s, u = config.schedule, config.unet
    sampler = sampler or s.sampler
    if sampler == "adaptive":
        raise ValueError("the adaptive sampler chooses its own steps; pass --sampler ddim, "
                         "euler, dpmpp_2m or ddpm")
    denoise = denoiser(model, s.prediction, s.beta_schedule, guidance=s.guidance)
    found = optimize_schedule(denoise, (u.image_size, u.image_size, u.channels), steps,
                              s.beta_schedule, sampler, batch=batch, seed=seed,
                              time_limit_s=seconds)
    emit(f"optimised {steps} times for {sampler} in {found.seconds:.1f} s "
         f"({found.evaluations} evaluations): error {found.error:.4g} vs "
         f"{found.baseline_error:.4g} for trailing spacing")
    tuned = replace(config, schedule=replace(s, sampler=sampler, steps=steps,
                                             spacing="optimized", timesteps=found.times))
    dataset = dv.dataset_of(src.space)
    point = dv.measure(model, tuned, src, dataset, results / "feature-nets")
    with tempfile.TemporaryDirectory(dir=_work(results)) as work:
        folder = _retarget_checkpoint(src.folder, tuned, Path(work) / "model")
        detail = {"what": f"optimized {sampler} {steps} steps", "sampler": sampler,
                  "steps": steps, "times": list(found.times), "error": found.error,
                  "baseline_error": found.baseline_error, "evaluations": found.evaluations,
                  "seconds": found.seconds, "seed": seed}
        label = dv.record(src, "schedule", tuned, point, folder, detail, results)
    _report(label, src, point)
    return label


def _retarget_checkpoint(folder: Path, config: Any, out: Path) -> Path:
    """A copy of checkpoint ``folder`` whose config samples with ``config.schedule``."""
    shutil.copytree(folder, out)
    meta = json.loads((out / "config.json").read_text())
    meta["config"] = config.to_dict()
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def _work(results: Path) -> Path:
    folder = results / "work"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
