"""Reports on a study: status per trial and per worker, the Pareto table, and its plot.

Everything here reads the storage and renders text or a PNG; the Pareto arithmetic
itself is :mod:`search.pareto`.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search import pareto
from search.derived.points import companion, source
from search.space import SearchSpace
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES

LABELS = {"fid": "FID", "latency_ms": "latency (ms)", "peak_mem_mb": "peak memory (MB)"}


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, *body])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)




# -- status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStats:
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
            device[t.finished.worker] = _device(t.finished.device)
    return [WorkerStats(w, device.get(w, "?"), count[w], busy[w],
                        3600.0 * count[w] / busy[w] if busy[w] else 0.0) for w in sorted(count)]


def _device(d: Mapping[str, Any]) -> str:
    blas = f", {str(d.get('blas', '')).split(' ')[0]}" if d.get("backend") == "cpu" else ""
    return f"{d.get('backend')}: {d.get('chip')} ({d.get('memory_gb')} GB{blas})"


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
    """Trials by state, per-worker throughput and device, ETA, and every failure or prune."""
    trials = study.get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials if st.is_finished(t))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    records = [rec.read(t) for t in trials]
    requeued = sum(r.lineage.requeued for r in records)
    eta = eta_s(study)
    attrs = study.user_attrs
    head = (f"study {study.study_name}: space {attrs.get('space_name')}, sampler "
            f"{attrs.get('sampler')} (seed {attrs.get('seed')})")
    counts = (f"trials: {sum(states.values())}/{attrs.get('target', '?')} finished "
              f"(complete {states[TrialState.COMPLETE]}, pruned {states[TrialState.PRUNED]}, "
              f"failed {states[TrialState.FAIL]}); running {running}, waiting {waiting}, "
              f"re-queued {requeued}" + (f"; ETA {eta / 60:.1f} min" if eta else ""))
    lines = [head, counts, ""]
    extra = companion(study)
    if extra is not None:
        note = (f"derived points (distill, compress, schedule): {len(extra.trials)}; "
                f"see diffnas pareto {study.study_name}")
        lines[-1:] = [note, ""]
    stats = worker_stats(trials)
    if stats:
        lines += [_table(["worker", "trials", "busy s", "trials/h", "device"],
                         [[w.name, w.trials, round(w.busy_s, 1), round(w.per_hour, 1), w.device]
                          for w in stats]), ""]
    rows = [[r.number, r.state.name, *(_values(t)), r.finished.worker or "-", _wall(t),
             r.reason] for r, t in zip(records, trials)]
    lines.append(_table(["trial", "state", *OBJECTIVES, "worker", "wall s", "reason"], rows))
    return "\n".join(lines)


def _values(trial: FrozenTrial) -> list[float | None]:
    return list(trial.values) if trial.values else [None] * len(OBJECTIVES)


def _wall(trial: FrozenTrial) -> float | None:
    wall = (rec.read(trial).finished.timings or {}).get("wall_s")
    return None if wall is None else round(float(wall), 1)


def trial_text(study: optuna.Study, label: int | str) -> str:
    """One trial in full: state and reason, params, every stage record, rungs with decisions.

    ``label`` is a trial number, or ``d<n>`` for a derived point (:mod:`search.derived.points`).
    """
    label = str(label)
    if label.startswith("d"):
        t = source(study, label).trial
    else:
        trials = {str(t.number): t for t in study.get_trials(deepcopy=False)}
        if label not in trials:
            raise st.StudyError(f"study {study.study_name!r} has no trial {label}")
        t = trials[label]
    r = rec.read(t)
    lines = [f"trial {label}: {r.state.name}" + (f" -- {r.reason}" if r.reason else "")]
    if r.derived is not None:
        detail = {k: v for k, v in r.derived.detail.items() if k not in ("stages", "rows")}
        lines.append(f"derived ({r.derived.kind}) from trial {r.derived.source}: "
                     + json.dumps(detail, sort_keys=True, default=str))
    if r.values:
        lines.append("values: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, r.values)))
    if r.lineage.requeued_from is not None:
        lines.append(f"re-runs the params of trial {r.lineage.requeued_from}")
    if r.constraints:
        lines.append("constraints (> 0 violates): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in r.constraints.items()))
    lines.append("params: " + json.dumps(r.params, sort_keys=True))
    return "\n".join(lines + _lineage_lines(r.lineage) + _stage_lines(r))


def _lineage_lines(lineage: rec.Lineage) -> list[str]:
    lines = []
    if lineage.parent is not None:
        lines.append(f"mutation of trial {lineage.parent}: {lineage.mutation or '?'}")
    if (d := lineage.adaptation) is not None:
        lines.append(f"adapted ({d.trigger}) from trial {d.parent} at its step {d.at_step}: "
                     f"{d.reason}; trains its {d.steps} steps left")
    if (into := lineage.adapted_into) is not None:
        lines.append(f"continued as trial {into.trial} ({into.trigger}: {into.change})")
    return lines


def _stage_lines(r: rec.TrialRecord) -> list[str]:
    """The stage records, in the order a trial lives, then rungs and attempts."""
    f = r.finished
    docs = {rec.PRESCREEN: r.prescreen.to_doc() if r.prescreen else None,
            rec.PREDICTED: r.predicted,
            rec.MEASURED: r.measured.to_doc() if r.measured else None,
            rec.STEP_BUDGET: r.step_budget.doc if r.step_budget else None,
            rec.CONVERSION: r.conversion.to_doc() if r.conversion else None,
            rec.INHERITANCE: r.inheritance.doc if r.inheritance else None,
            rec.QUALITY: f.quality, rec.TIMINGS: f.timings, rec.WORKER: f.worker or None,
            rec.DEVICE: f.device}
    lines = [f"{key}: {json.dumps(doc, sort_keys=True, default=str)}"
             for key, doc in docs.items() if doc is not None]
    for rung in r.rungs:
        why = f" ({rung.reason})" if rung.reason else ""
        lines.append(f"rung step {rung.step}: val_loss {rung.val_loss:.4f} -> "
                     f"{rung.decision}{why}")
    for attempt in r.attempts:
        lines.append(f"attempt {attempt.attempt + 1} on {attempt.worker}: "
                     f"{attempt.status} {attempt.reason}".rstrip())
    return lines


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
    """The non-dominated trials (sorted by FID) with their configs, and the hypervolume."""
    rows = []
    for i in np.flatnonzero(result.on_front)[np.argsort(result.points[result.on_front, 0])]:
        r = rec.read(result.trials[i])
        rows.append([result.labels[i], *result.points[i].tolist(),
                     (r.finished.quality or {}).get("fid_floor"),
                     r.prescreen.params if r.prescreen else None, _summary(r)])
    ref = ", ".join(f"{v:.4g}" for v in result.reference)
    head = (f"{int(result.on_front.sum())} non-dominated of {len(result.trials)} complete trials "
            f"({int((~result.feasible).sum())} infeasible); hypervolume {result.hypervolume:.4g} "
            f"w.r.t. ({ref})")
    derived = sum(label.startswith("d") for label in result.labels)
    if derived:
        head += f"; {derived} of them derived (d<n>: distilled, compressed or tuned)"
    return head + "\n" + _table(["trial", *OBJECTIVES, "fid floor", "params", "candidate"], rows)


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


def plot_front(result: Front, path: Path, title: str = "") -> Path:
    """One panel per pair of objectives: front, dominated and infeasible drawn distinctly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(0, 1), (0, 2), (1, 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(15, 4.6))
    dominated = result.feasible & ~result.on_front
    for ax, (i, j) in zip(axes, pairs):
        p = result.points
        ax.scatter(p[dominated, i], p[dominated, j], c="0.6", s=22, label="dominated")
        ax.scatter(p[~result.feasible, i], p[~result.feasible, j], c="tab:red", marker="x",
                   s=36, label="infeasible")
        ax.scatter(p[result.on_front, i], p[result.on_front, j], c="tab:blue", marker="*",
                   s=110, edgecolors="k", linewidths=0.5, label="non-dominated")
        for k in np.flatnonzero(result.on_front):
            ax.annotate(result.labels[k], (p[k, i], p[k, j]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(LABELS[OBJECTIVES[i]])
        ax.set_ylabel(LABELS[OBJECTIVES[j]])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title + ': ' if title else ''}Pareto front of {len(result.trials)} trials, "
                 f"hypervolume {result.hypervolume:.4g}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

