"""Reports on a study: status per trial and per worker, the Pareto front and its table, and
the command that opens the study in optuna-dashboard.

Everything here reads the storage and renders text; one trial in sections is
:mod:`search.report_trial`, the Pareto arithmetic itself :mod:`search.pareto`, the plot
:mod:`search.plot`, the machine-readable rows :mod:`search.rows`.
"""

from __future__ import annotations

import collections
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search import pareto, walltime
from search.derived.points import companion
from search.report_format import cell, device_line, table
from search.report_trial import disturbed_note
from search.space import SearchSpace
from search.storage import lease
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES

# -- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStats:
    """One worker's row of the status table."""

    name: str
    device: str
    trials: int
    busy_s: float
    per_hour: float


def worker_stats(trials: Sequence[FrozenTrial]) -> list[WorkerStats]:
    """Per worker: finished attempts, device, busy time and trials per hour of busy time."""
    busy: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    device: dict[str, str] = {}
    for t in map(rec.read, trials):
        for a in t.attempts:
            busy[a.worker] += max(0.0, a.ended - a.started)
            count[a.worker] += 1
        if t.finished.worker and t.finished.device:
            device[t.finished.worker] = device_line(t.finished.device)
    return [WorkerStats(w, device.get(w, "?"), count[w], busy[w],
                        3600.0 * count[w] / busy[w] if busy[w] else 0.0) for w in sorted(count)]


def eta_s(study: optuna.Study) -> float | None:
    """Remaining trials x mean trial wall time / workers now busy (None when idle or unknown)."""
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    walls = [w for t in trials if t.state == TrialState.COMPLETE and (w := _wall(t))]
    target = int(study.user_attrs.get("target", 0))
    remaining = target - sum(st.is_finished(t) for t in trials)
    if not running or not walls or remaining <= 0:
        return None
    return float(np.mean(walls)) * remaining / len(running)


def status_text(study: optuna.Study) -> str:
    """Trials by state, where the wall time went (:mod:`search.walltime`), per-worker
    throughput and device, ETA, and every failure or prune."""
    trials = study.get_trials(deepcopy=False)
    records = [rec.read(t) for t in trials]
    lines = [_head_line(study), _counts_line(study, trials, records), *_notes(study), ""]
    stats = worker_stats(trials)
    if stats:
        lines += [table(["worker", "trials", "busy s", "trials/h", "device"],
                        [[w.name, w.trials, round(w.busy_s, 1), round(w.per_hour, 1), w.device]
                         for w in stats]), ""]
    rows = [[r.number, r.state.name, *(_values(t)), r.finished.worker or "-", _wall(t),
             "; ".join(n for n in (r.reason, disturbed_note(r)) if n)]
            for r, t in zip(records, trials)]
    lines.append(table(["trial", "state", *OBJECTIVES, "worker", "wall s", "reason"], rows))
    return "\n".join(lines)


def _head_line(study: optuna.Study) -> str:
    attrs = study.user_attrs
    return (f"study {study.study_name}: space {attrs.get('space_name')}, sampler "
            f"{attrs.get('sampler')} (seed {attrs.get('seed')}); {lease.describe(study)}")


def _counts_line(study: optuna.Study, trials: Sequence[FrozenTrial],
                 records: Sequence[rec.TrialRecord]) -> str:
    states = collections.Counter(t.state for t in trials if st.is_finished(t))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    requeued = sum(r.lineage.requeued for r in records)
    holder = lease.read(study)
    alive = holder is not None and holder.alive(time.time())
    eta = eta_s(study) if alive else None  # no coordinator, no progress: no ETA
    return (f"trials: {sum(states.values())}/{study.user_attrs.get('target', '?')} finished "
            f"(complete {states[TrialState.COMPLETE]}, pruned {states[TrialState.PRUNED]}, "
            f"failed {states[TrialState.FAIL]}); running {running}, waiting {waiting}, "
            f"re-queued {requeued}" + (f"; ETA {eta / 60:.1f} min" if eta else ""))


def _notes(study: optuna.Study) -> list[str]:
    """The derived points' count and where the wall time went, where the study has them."""
    notes = []
    extra = companion(study)
    if extra is not None:
        notes.append(f"derived points (distill, compress, schedule): {len(extra.trials)}; "
                     f"see diffnas pareto {study.study_name}")
    spent = walltime.summarize(study)
    if spent is not None:
        notes.append(walltime.summary_line(spent))
    return notes


def _values(trial: FrozenTrial) -> list[float | None]:
    return list(trial.values) if trial.values else [None] * len(OBJECTIVES)


def _wall(trial: FrozenTrial) -> float | None:
    wall = (rec.read(trial).finished.timings or {}).get("wall_s")
    return None if wall is None else round(float(wall), 1)


# -- the Pareto front --------------------------------------------------------------------


@dataclass(frozen=True)
class Front:
    """Completed trials split into front / dominated / infeasible, with the hypervolume."""

    trials: tuple[FrozenTrial, ...]
    labels: tuple[str, ...]  # "3" for a search trial, "d0" for a derived point
    points: np.ndarray  # (n, 3) in OBJECTIVES order
    on_front: np.ndarray  # (n,) bool
    feasible: np.ndarray  # (n,) bool
    reference: tuple[float, ...]
    hypervolume: float


def front(study: optuna.Study, space: SearchSpace | None = None,
          reference: Sequence[float] | None = None) -> Front:
    """The front among feasible COMPLETE trials and derived points (distilled, compressed,
    tuned; :mod:`search.derived.points`); the reference point is, in order of preference,
    ``reference``, the space's ``reference_point``, or 10% past the worst."""
    extra = companion(study)
    pairs = [(t, str(t.number)) for t in study.get_trials(deepcopy=False)]
    pairs += [(t, f"d{t.number}") for t in (extra.get_trials(deepcopy=False) if extra else [])]
    pairs = [(t, label) for t, label in pairs if t.state == TrialState.COMPLETE and t.values]
    trials, labels = tuple(t for t, _ in pairs), tuple(label for _, label in pairs)
    points = st.objective_values(trials)
    ok = np.array([st.feasible(t) for t in trials], bool)
    on_front = np.zeros(len(trials), bool)
    if ok.any():
        on_front[np.flatnonzero(ok)] = pareto.pareto_mask(points[ok])
    ref = tuple(reference or (space.study.reference_point if space else ()) or (
        tuple(pareto.default_reference(points[ok])) if ok.any() else ()))
    hv = pareto.hypervolume(points[ok], ref) if ok.any() else 0.0
    return Front(trials, labels, points, on_front, ok, ref, float(hv))


def pareto_text(result: Front) -> str:
    """The non-dominated trials (sorted by FID) with their configs, and the hypervolume.

    The ``differs`` column names every parameter whose value is not the same on all front
    rows, so that rows whose summaries read alike are told apart.
    """
    order = np.flatnonzero(result.on_front)[np.argsort(result.points[result.on_front, 0])]
    records = [rec.read(result.trials[i]) for i in order]
    keys = differing([r.params for r in records])
    names = short_names(keys)
    rows = [[result.labels[i], *result.points[i].tolist(),
             (r.finished.quality or {}).get("fid_floor"),
             r.prescreen.params if r.prescreen else None,
             " ".join(f"{names[k]}={cell(r.params.get(k))}" for k in keys) or "-",
             _summary(r)] for i, r in zip(order, records)]
    ref = ", ".join(f"{v:.4g}" for v in result.reference)
    head = (f"{int(result.on_front.sum())} non-dominated of {len(result.trials)} complete trials "
            f"({int((~result.feasible).sum())} infeasible); hypervolume {result.hypervolume:.4g} "
            f"w.r.t. ({ref})")
    derived = sum(label.startswith("d") for label in result.labels)
    if derived:
        head += f"; {derived} of them derived (d<n>: distilled, compressed or tuned)"
    return head + "\n" + table(["trial", *OBJECTIVES, "fid floor", "weights", "differs",
                                 "candidate"], rows)


def differing(params: Sequence[Mapping[str, Any]]) -> list[str]:
    """The parameter names whose values are not all equal across ``params`` (a name some
    rows lack counts as differing), in sorted order; none for fewer than two rows."""
    if len(params) < 2:
        return []
    names = sorted({k for p in params for k in p})
    missing = object()
    return [k for k in names if len({repr(p.get(k, missing)) for p in params}) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``train.learning_rate`` -> ``learning_rate`` where that last part is unambiguous."""
    last = collections.Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k: k.rsplit(".", 1)[-1] if last[k.rsplit(".", 1)[-1]] == 1 else k for k in keys}


def _summary(r: rec.TrialRecord) -> str:
    """``w16/32 silu attn[1] | ddim 8 steps trailing cosine eps`` (and what derived it)."""
    if r.config is None:
        return "-"
    u, s = r.config.unet, r.config.schedule
    widths = "/".join(str(u.base_width * m) for m in u.width_mults)
    attn = f" attn{list(u.attn_levels)}" if u.attn_levels else ""
    text = (f"w{widths} {u.activation}{attn} | {s.sampler} {s.steps} steps "
            f"{s.spacing} {s.beta_schedule} {s.prediction}")
    return f"{text} | {r.derived.summary()}" if r.derived is not None else text


# -- optuna-dashboard --------------------------------------------------------------------


def dashboard_command(storage: str, artifacts: Path) -> str:
    """A ``uvx optuna-dashboard`` command that works pasted from any folder: local files as
    absolute paths, each argument shell-quoted, any password in the URL redacted; a
    PostgreSQL URL brings its driver into uvx's throwaway environment."""
    driver = ["--with", "psycopg[binary]"] if storage.startswith("postgresql") else []
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        storage = f"sqlite:///{Path(storage.removeprefix('sqlite:///')).resolve()}"
    elif storage.startswith("journal:"):  # the dashboard takes a journal file by its path
        storage = str(Path(storage.removeprefix("journal:").removeprefix("//")).resolve())
    return shlex.join(["uvx", *driver, "optuna-dashboard", st.redact(storage), "--artifact-dir",
                       str(Path(artifacts).resolve())])
