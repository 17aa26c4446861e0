"""Trial artifacts on the coordinator: written under ``results/<study>/trial-<n>/``,
registered with Optuna's artifact store (so optuna-dashboard shows each sample grid), and
exported for ``diffnas sample``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from search.storage import record as rec
from search.storage.study import StudyError

ARTIFACT_DIR = "artifacts"
WEIGHTS = "checkpoint/ema.safetensors"  # the EMA weights a child trial can inherit
REGISTERED = {"samples.png": "image/png", "metrics.json": "application/json",
              "checkpoint/config.json": "application/json"}


def trial_dir(results: Path, study: str, number: int) -> Path:
    return results / study / f"trial-{number}"


def artifact_store(results: Path) -> FileSystemArtifactStore:
    """The store optuna-dashboard reads with ``--artifact-dir results/artifacts``."""
    folder = results / ARTIFACT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def write_trial(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write ``files`` (relative path -> bytes) into ``folder`` atomically; returns name -> path.

    The files go to a sibling temporary folder first, which then replaces ``folder``, so a
    killed coordinator never leaves a half-written trial folder behind under its name.
    """
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        path = tmp / rel
        if path.resolve().parent != (tmp / rel).parent.resolve() or ".." in Path(rel).parts:
            raise ValueError(f"artifact path {rel!r} escapes the trial folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {rel: str(folder / rel) for rel in files}


def register(trial: optuna.Trial, store: FileSystemArtifactStore, paths: dict[str, str]
             ) -> dict[str, str]:
    """Upload the dashboard-worthy files to the artifact store; returns name -> artifact id."""
    ids = {}
    for rel, mimetype in REGISTERED.items():
        if rel in paths:
            ids[rel] = upload_artifact(artifact_store=store, file_path=paths[rel],
                                       study_or_trial=trial, mimetype=mimetype)
    return ids


def export_trial(study: optuna.Study, number: int, out: Path) -> Path:
    """Copy a trial's checkpoint (weights, config), sample grid and metrics into ``out``.

    ``out`` is then a checkpoint folder: ``diffnas sample OUT`` draws from it.

    Raises:
        StudyError: no such trial, no artifacts (not COMPLETE), or files missing on disk.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise StudyError(f"study {study.study_name!r} has no trial {number}")
    trial = trials[number]
    paths = dict(rec.read(trial).finished.artifacts or {})
    if not paths:
        raise StudyError(f"trial {number} has no artifacts (state {trial.state.name})")
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        raise StudyError(f"trial {number}: artifact file missing: {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    for rel, src in paths.items():
        shutil.copy2(src, out / Path(rel).name)
    return out
