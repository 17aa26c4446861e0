"""Trial artifacts on the coordinator: written under ``results/<study>/trial-<n>/``,
registered with Optuna's artifact store (so optuna-dashboard shows each sample grid), and
exported for ``diffnas sample``.

``results/<study>/`` belongs to one study in one storage: :func:`claim` writes the study's
random id into :data:`MARKER` there (and the folder into the study), and refuses a folder
whose marker names another id, so two storages' studies of one name never overwrite each
other's trials. Every path built from a name resolves under its root (:func:`under`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from search.storage import record as rec
from search.storage.paths import check_dir
from search.storage.study import StudyError, check_name, identity

ARTIFACT_DIR = "artifacts"
MARKER = ".diffnas-study"  # in results/<study>/: the id of the study that owns the folder
WEIGHTS = "checkpoint/ema.safetensors"  # the EMA weights a child trial can inherit
REGISTERED = {"samples.png": "image/png", "metrics.json": "application/json",
              "checkpoint/config.json": "application/json"}


def under(root: Path, *parts: str) -> Path:
    """``root/parts...``, resolved; it must stay inside ``root``.

    Raises:
        StudyError: the resolved path escapes ``root`` (``..``, an absolute part, a link).
    """
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise StudyError(f"path {'/'.join(parts)!r} escapes {root}")
    return path


def trial_dir(results: Path, study: str, number: int) -> Path:
    return under(results, study, f"trial-{number}")


def claim(results: Path, study: optuna.Study) -> Path:
    """Make ``results/<study>/`` this study's folder; returns it.

    Call it while holding the study's lease. The study records the folder (``results``
    user attribute); the folder records the study's id (:data:`MARKER`).

    Raises:
        StudyError: the folder belongs to another study (same name, other storage).
    """
    uid = identity(study)
    folder = under(results, check_name(study.study_name))
    owner = owner_of(folder)
    if owner is not None and owner != uid:
        raise StudyError(f"{folder} holds the trials of another study named "
                         f"{study.study_name!r} (id {owner}, another storage); pass another "
                         "--results or --study")
    folder.mkdir(parents=True, exist_ok=True)
    if owner is None:
        (folder / MARKER).write_text(json.dumps({"id": uid, "study": study.study_name}))
    study.set_user_attr("results", str(folder))
    return folder


def owner_of(folder: Path) -> str | None:
    """The id in ``folder``'s marker, or ``None`` for a folder no study claimed yet."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["id"])
    except (ValueError, KeyError, TypeError):
        raise StudyError(f"{marker}: not a diffnas study marker; remove it if the folder "
                         "is yours") from None


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
        PathError: ``out`` is a file, or under one.
    """
    check_dir(out, "export folder")
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
    _check_owner(study, number, paths)
    out.mkdir(parents=True, exist_ok=True)
    for rel, src in paths.items():
        shutil.copy2(src, out / Path(rel).name)
    return out


def _check_owner(study: optuna.Study, number: int, paths: dict[str, str]) -> None:
    """Refuse artifacts under a study folder that another study (by id) has claimed."""
    uid = study.user_attrs.get("uid")
    folders = {Path(p).resolve().parent for p in paths.values()}
    for folder in folders:
        marked = next((f for f in (folder, *folder.parents) if (f / MARKER).is_file()), None)
        owner = owner_of(marked) if marked is not None else None
        if uid is not None and owner is not None and owner != uid:
            raise StudyError(f"trial {number}: its artifacts in {marked} now belong to "
                             f"another study (id {owner}, not {uid}); refusing to export them")
