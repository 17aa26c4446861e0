"""The Optuna study: storage, create-or-resume, the seeded sampler, and stale-trial recovery.

Resume is the same call as a fresh start: :func:`open_study` with an existing name
continues it. Trials a killed coordinator left RUNNING become FAIL and their parameters
are queued again exactly once; the sampler is rebuilt from its seed and the stored trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError

from search.space import SearchSpace, parse_space
from search.storage import lineage as lin
from search.storage import paths
from search.storage import record as rec
from workers.records import OBJECTIVES

STORAGE_FILE = "diffnas.db"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
MAX_DEATHS = 2  # coordinator deaths on one parameter set before it fails for good
STALE = "coordinator stopped mid-trial; params queued again"
SETUP_WAIT_S = 2.0  # how long a study found without its space may still be mid-creation
HIDDEN = "***"  # what a password reads as wherever a storage URL is shown
_USERINFO = re.compile(r"(://[^:/@]*):[^@/]*@")  # scheme://user:password@ (not SQLAlchemy's)
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd)=)[^&#]*")  # libpq takes ?password=

optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyError(ValueError):
    """A study that cannot be opened: unknown name, unreachable storage, mismatched space."""


def check_name(name: str) -> str:
    """``name`` if it may name a study (it becomes a folder under ``results/``).

    Raises:
        StudyError: anything but letters, digits, ``-``, ``_``, ``.`` (no separators, not
            ``..``), or longer than 100 characters.
    """
    if not NAME.fullmatch(name) or set(name) == {"."}:
        raise StudyError(f"study name {name!r}: use 1-100 letters, digits, '-', '_' or '.' "
                         "(it names a folder under results/)")
    return name


def default_storage(results: Path) -> str:
    """The embedded default: one SQLite file under ``results/`` (optuna-dashboard opens it)."""
    return f"sqlite:///{(results / STORAGE_FILE).resolve()}"


def open_storage(url: str, create: bool) -> BaseStorage:
    """An Optuna storage for ``url`` (any RDB URL, or ``journal:PATH`` for a journal file).

    Args:
        url: the storage URL.
        create: whether a missing SQLite or journal file may be created.

    Raises:
        StudyError: the URL is malformed or the storage cannot be reached, in one line.
        PathError: a SQLite or journal file under a regular file, or at a folder.
    """
    path = check_local_path(url)
    if path is not None and not create and not path.exists():
        raise StudyError(f"no study storage at {path} (run `diffnas search` first, or pass "
                         "--storage)")
    if path is not None and create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path is not None and url.startswith("sqlite:") and path.is_file():
        check_sqlite(path)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        with _creating(path if url.startswith("sqlite:") and create else None):
            storage = optuna.storages.RDBStorage(url)
    except ImportError as err:
        raise _driver_error(url, err) from None
    except Exception as err:  # noqa: BLE001 (sqlalchemy, drivers and sockets raise many kinds)
        raise StudyError(failure("cannot open storage {url}", url, err)) from None
    event.listen(storage.engine, "handle_error", _one_line(url))
    return storage


@contextlib.contextmanager
def _creating(path: Path | None):
    """Hold the SQLite file's folder locked while Optuna opens it (``None``: no lock).

    Two coordinators started at once on a new file would both create its tables, and the
    second fails on alembic's version row; under the lock the second finds them made.
    """
    if path is None:
        yield
        return
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # closing the descriptor releases the lock


def redact(url: str) -> str:
    """``url`` with any password shown as ``***`` (``postgresql://ann:***@db/studies``).

    Every place that prints a storage URL prints this instead: errors, the dashboard hint,
    a search's result. A URL without a password comes back unchanged.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # journal:PATH and other non-SQLAlchemy URLs
        return _QUERY_SECRET.sub(rf"\1{HIDDEN}", _USERINFO.sub(rf"\1:{HIDDEN}@", url))
    shown = parsed.render_as_string(hide_password=True) if parsed.password is not None else url
    return _QUERY_SECRET.sub(rf"\1{HIDDEN}", shown)


def failure(what: str, url: str, err: BaseException) -> str:
    """One line: ``what`` with ``{url}`` filled in redacted, then the error's first line.

    The error's own text loses any password the URL holds too: a driver may quote its
    connection string.
    """
    return f"{what.format(url=redact(url))}: {_hide_secrets(_first_line(err), url)}"


def _hide_secrets(text: str, url: str) -> str:
    secrets = set(re.findall(r"(?i)[?&](?:password|passwd)=([^&#]*)", url))
    secrets.update(re.findall(r"://[^:/@]*:([^@/]*)@", url))  # as written (percent-encoded)
    with contextlib.suppress(ArgumentError, ValueError):
        secrets.add(str(make_url(url).password or ""))
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


def _driver_error(url: str, err: ImportError) -> StudyError:
    """The one line for a storage whose database driver is not installed.

    Optuna wraps SQLAlchemy's import error: the missing module's name is on the cause.
    """
    cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
    module = cause.name or "the database driver"
    if module == "psycopg":
        fix = "run `uv sync --extra postgres` (or `pip install 'diffnas[postgres]'`)"
    else:
        fix = f"install the Python module {module!r} into this environment"
    return StudyError(f"storage {redact(url)} needs the module {module!r}, which is not "
                      f"installed: {fix}")


def check_local_path(url: str) -> Path | None:
    """The file of a SQLite or journal ``url`` (``None`` for a server), if it can be one.

    Raises:
        PathError: the file would be under a regular file, or is a folder.
    """
    path = _local_file(url)
    return None if path is None else paths.check_file(path, "storage")


def check_sqlite(path: Path) -> None:
    """Refuse a damaged SQLite file before Optuna (or anything) writes to it.

    Raises:
        StudyError: ``PRAGMA quick_check`` does not answer ``ok``, or the file is not a
            database at all.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
        answer = "; ".join(str(r[0]) for r in rows[:1]) if rows else "ok"
    except sqlite3.Error as err:
        answer = str(err)
    if answer != "ok":
        raise StudyError(f"storage {path} is damaged (sqlite quick_check: {answer}); nothing "
                         "was written: restore it from a backup, or pass another --storage")


def _one_line(url: str) -> Any:
    """A ``handle_error`` hook: a damaged or failing database mid-run becomes a StudyError.

    Integrity and operational errors (a lock, a deadlock) pass through untouched: Optuna
    retries or handles those itself.
    """
    def hook(ctx: ExceptionContext) -> None:
        orig = ctx.original_exception
        if isinstance(orig, sqlite3.DatabaseError) and not isinstance(
                orig, (sqlite3.IntegrityError, sqlite3.OperationalError)):
            raise StudyError(failure("storage {url} failed", url, orig)) from None
    return hook


def _local_file(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def study_names(storage: BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def load_existing(storage: BaseStorage, name: str) -> optuna.Study:
    """Open a study that must exist (for status, pareto, export).

    Raises:
        StudyError: no study of that name, naming the ones that exist; or a study written
            in a newer record format than this diffnas reads.
    """
    names = study_names(storage)
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise StudyError(f"unknown study {name!r} (studies here: {known})")
    study = optuna.load_study(study_name=name, storage=storage, sampler=_quiet_sampler())
    written = int(study.user_attrs.get("format", rec.FORMAT))
    if written > rec.FORMAT:
        raise StudyError(f"study {name!r} is in record format {written}, newer than this "
                         f"diffnas reads ({rec.FORMAT}): upgrade diffnas to open it")
    return study


def _quiet_sampler() -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=0)


def stored_space(study: optuna.Study) -> SearchSpace:
    """The search space a study was created with."""
    attrs = study.user_attrs
    if "space" not in attrs:
        raise StudyError(f"study {study.study_name!r} was never set up (its creator stopped "
                         "first): run `diffnas search` with its space to set it up")
    return parse_space(attrs["space"], name=attrs.get("space_name", study.study_name),
                       origin=f"study {study.study_name}")


def open_study(storage: BaseStorage, name: str, space: SearchSpace | None,
               sampler: str | None = None, seed: int | None = None
               ) -> tuple[optuna.Study, SearchSpace, bool]:
    """Create study ``name`` or resume it; returns ``(study, space, resumed)``.

    A resumed study keeps its stored space, sampler and seed; passing a space whose search
    differs (anything but the trial target) is an error.

    Raises:
        StudyError: a new study without a space, or a space that does not match.
    """
    if name in study_names(storage):
        study = load_existing(storage, name)
        if not _set_up(storage, name):
            return _finish_setup(study, space, sampler, seed)
        stored = stored_space(study)
        if space is not None and space.fingerprint() != stored.fingerprint():
            raise StudyError(f"study {name!r} was created with a different search space; "
                             "pass the same space (or none) to resume, or choose a new --study")
        sampler_name, seed_value = study.user_attrs["sampler"], study.user_attrs["seed"]
        if (sampler not in (None, sampler_name)) or (seed not in (None, seed_value)):
            raise StudyError(f"study {name!r} uses sampler {sampler_name} with seed "
                             f"{seed_value}; drop --sampler/--seed to resume it")
        study.sampler = make_sampler(stored, sampler_name, seed_value, len(study.trials))
        return study, space or stored, True
    if space is None:
        raise StudyError(f"unknown study {name!r}: give a space (--preset or --space) to "
                         "create it")
    try:
        study = optuna.create_study(storage=storage, study_name=name,
                                    directions=["minimize"] * len(OBJECTIVES))
    except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
        _wait_created(storage, name)
        return open_study(storage, name, space, sampler, seed)
    return _finish_setup(study, space, sampler, seed)


def _set_up(storage: BaseStorage, name: str) -> bool:
    """Whether study ``name`` holds its space: a creator that stopped between creating
    the study and writing its space leaves one without (given a few seconds, in case that
    creator is writing it right now)."""
    try:
        _wait_created(storage, name, timeout_s=SETUP_WAIT_S)
    except StudyError:
        pass
    study_id = storage.get_study_id_from_name(name)
    return "space" in storage.get_study_user_attrs(study_id)


def _finish_setup(study: optuna.Study, space: SearchSpace | None, sampler: str | None,
                  seed: int | None) -> tuple[optuna.Study, SearchSpace, bool]:
    """Write a new study's space, sampler, seed and id; ``created`` last, so that a study
    holding it is whole. A half-made one (its creator stopped) is finished the same way."""
    if space is None:
        raise StudyError(f"study {study.study_name!r} was never set up (its creator stopped "
                         "first): give its space (--preset or --space) to set it up")
    sampler_name = sampler or space.study.sampler
    seed_value = space.study.seed if seed is None else seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    for key, value in {"format": rec.FORMAT, "space": space.source, "space_name": space.name,
                       "sampler": sampler_name, "seed": seed_value, "uid": uuid.uuid4().hex,
                       "created": time.time()}.items():
        study.set_user_attr(key, value)
    study.sampler = make_sampler(space, sampler_name, seed_value, len(study.trials))
    return study, space, False


def _wait_created(storage: BaseStorage, name: str, timeout_s: float = 30.0) -> None:
    """Wait until the process that created study ``name`` has written its attributes."""
    study_id = storage.get_study_id_from_name(name)
    deadline = time.time() + timeout_s
    while "created" not in storage.get_study_user_attrs(study_id):
        if time.time() > deadline:
            raise StudyError(f"study {name!r} was created by another process that never "
                             "finished setting it up")
        time.sleep(0.2)


def identity(study: optuna.Study) -> str:
    """The study's random id (``uid``), which ties it to its results folder; a study
    written before ids existed gets one now (call this only while holding its lease)."""
    uid = study.user_attrs.get("uid")
    if uid is None:
        uid = uuid.uuid4().hex
        study.set_user_attr("uid", uid)
    return str(uid)


def make_sampler(space: SearchSpace, name: str, seed: int, n_existing: int) -> BaseSampler:
    """The seeded sampler; on resume its seed also depends on how many trials exist, so a
    restarted random start-up phase does not propose the same parameters again."""
    derived = int(np.random.SeedSequence([seed, n_existing]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return NSGAIISampler(population_size=space.study.population, seed=derived)
        return TPESampler(seed=derived, n_startup_trials=space.study.startup_trials,
                          multivariate=True, constant_liar=True)


def is_finished(trial: FrozenTrial) -> bool:
    """Counts toward the target: COMPLETE, PRUNED, or FAIL that was not re-queued."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not lin.lineage_of(trial).requeued


def finished_count(study: optuna.Study) -> int:
    return sum(is_finished(t) for t in study.get_trials(deepcopy=False))


def requeue(study: optuna.Study, trial: optuna.Trial, reason: str,
            max_deaths: int | None = None) -> bool:
    """FAIL a RUNNING ``trial`` and queue its params as a new trial, exactly once.

    The new trial is queued before the old one fails, and carries ``requeued_from`` and
    the old one's lineage; a second call for the same trial (after another crash in
    between) queues nothing. With ``max_deaths``, a parameter set whose requeue chain
    (``requeued_from`` links) already holds ``max_deaths - 1`` trials failed with the
    same ``reason`` fails for good instead: a candidate that kills its coordinator cannot
    loop.

    Returns:
        Whether a new trial was queued.
    """
    trials = study.get_trials(deepcopy=False)
    already = any(lin.lineage_of(t).requeued_from == trial.number for t in trials)
    chain = _requeue_chain(trials, trial, reason)
    if max_deaths is not None and len(chain) >= max_deaths and not already:
        numbers = ", ".join(str(n) for n in sorted(chain))
        rec.write(trial, rec.Finished(reason=f"{reason.split(';')[0]} {len(chain)} times on "
                                      f"these params (trials {numbers}); failed for good, "
                                      "not queued again"))
        study.tell(trial, state=TrialState.FAIL)
        return False
    if not already:
        carried = lin.lineage_of(trial).carried()
        study.enqueue_trial(dict(trial.params), user_attrs=rec.attrs(replace(
            carried, requeued_from=trial.number)))
    rec.write(trial, rec.Finished(reason=reason), lin.Lineage(requeued=True))
    study.tell(trial, state=TrialState.FAIL)
    return not already


def _requeue_chain(trials: Sequence[FrozenTrial], trial: optuna.Trial, reason: str
                   ) -> list[int]:
    """``trial`` and the earlier runs of its params that failed with ``reason``."""
    by_number = {t.number: t for t in trials}
    chain, previous = [trial.number], lin.lineage_of(trial).requeued_from
    while previous is not None and previous in by_number and previous not in chain:
        earlier = by_number[previous]
        if rec.read(earlier).reason == reason:
            chain.append(previous)
        previous = lin.lineage_of(earlier).requeued_from
    return chain


def recover_stale(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """Requeue every trial left RUNNING by a coordinator that stopped; returns their numbers.

    A parameter set on which :data:`MAX_DEATHS` coordinators stopped fails for good.
    ``storage`` is the study's (Optuna offers no public way to get it from the study).
    """
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for trial in stale:
        requeue(study, running(study, storage, trial.number), STALE, MAX_DEATHS)
    return [t.number for t in stale]


def running(study: optuna.Study, storage: BaseStorage, number: int) -> optuna.Trial:
    """A live handle on RUNNING trial ``number`` (one a stopped coordinator left behind)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def objective_values(trials: Sequence[FrozenTrial]) -> np.ndarray:
    """``(n, 3)`` objective values of COMPLETE trials, in :data:`OBJECTIVES` order."""
    rows = [t.values for t in trials if t.state == TrialState.COMPLETE and t.values]
    return np.array(rows, float).reshape(-1, len(OBJECTIVES))


def feasible(trial: FrozenTrial) -> bool:
    """No recorded constraint is violated (a value > 0 is a violation)."""
    return all(v <= 0.0 for v in trial.constraints.values())
