"""Reports on a study: status per trial and per worker, one trial in sections, the Pareto
table, and the command that opens the study in optuna-dashboard.

Everything here reads the storage and renders text; the Pareto arithmetic itself is
:mod:`search.pareto`, the plot :mod:`search.plot`, the machine-readable rows
:mod:`search.rows`.
"""

from __future__ import annotations

import collections
import json
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
from search.derived.points import companion, source
from search.space import SearchSpace
from search.storage import lease
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES


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
    """Trials by state, where the wall time went (:mod:`search.walltime`), per-worker
    throughput and device, ETA, and every failure or prune."""
    trials = study.get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials if st.is_finished(t))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    records = [rec.read(t) for t in trials]
    requeued = sum(r.lineage.requeued for r in records)
    holder = lease.read(study)
    alive = holder is not None and holder.alive(time.time())
    eta = eta_s(study) if alive else None  # no coordinator, no progress: no ETA
    attrs = study.user_attrs
    head = (f"study {study.study_name}: space {attrs.get('space_name')}, sampler "
            f"{attrs.get('sampler')} (seed {attrs.get('seed')}); {lease.describe(study)}")
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
    spent = walltime.summarize(study)
    if spent is not None:
        lines[-1:] = [walltime.summary_line(spent), ""]
    stats = worker_stats(trials)
    if stats:
        lines += [_table(["worker", "trials", "busy s", "trials/h", "device"],
                         [[w.name, w.trials, round(w.busy_s, 1), round(w.per_hour, 1), w.device]
                          for w in stats]), ""]
    rows = [[r.number, r.state.name, *(_values(t)), r.finished.worker or "-", _wall(t),
             "; ".join(n for n in (r.reason, disturbed_note(r)) if n)]
            for r, t in zip(records, trials)]
    lines.append(_table(["trial", "state", *OBJECTIVES, "worker", "wall s", "reason"], rows))
    return "\n".join(lines)


def _values(trial: FrozenTrial) -> list[float | None]:
    return list(trial.values) if trial.values else [None] * len(OBJECTIVES)


def _wall(trial: FrozenTrial) -> float | None:
    wall = (rec.read(trial).finished.timings or {}).get("wall_s")
    return None if wall is None else round(float(wall), 1)


def trial_text(study: optuna.Study, label: int | str) -> str:
    """One trial in sections: head, decisions, rungs, attempts, result, timings, wall time
    (:mod:`search.walltime`), lineage.

    ``label`` is a trial number, or ``d<n>`` for a derived point (:mod:`search.derived.points`).

    Raises:
        StudyError: no such trial or derived point.
    """
    r = rec.read(find_trial(study, label))
    sections = {"": _head_lines(str(label), r), "decisions": _decision_lines(r),
                "rungs": _rung_lines(r), "attempts": _attempt_lines(r),
                "result": _result_lines(r), "timings": _timing_lines(r),
                "wall time": walltime.trial_lines(r.walltime) if r.walltime else [],
                "lineage": _lineage_lines(r.lineage)}
    out = []
    for title, lines in sections.items():
        if lines:
            out += ([f"\n{title}"] if title else []) + (
                [f"  {line}" for line in lines] if title else lines)
    return "\n".join(out)


def trial_json(study: optuna.Study, label: int | str) -> str:
    """The raw record of one trial (``diffnas status --trial N --json``): :func:`record_doc`.

    Raises:
        StudyError: no such trial or derived point.
    """
    doc = record_doc(rec.read(find_trial(study, label)))
    return json.dumps({"id": str(label), **doc}, indent=2, sort_keys=True, default=str)


def find_trial(study: optuna.Study, label: int | str) -> FrozenTrial:
    """The trial ``label`` (``3``) of ``study``, or its derived point ``d0``.

    Raises:
        StudyError: no such trial or derived point.
    """
    label = str(label)
    if label.startswith("d"):
        return source(study, label).trial
    trials = {str(t.number): t for t in study.get_trials(deepcopy=False)}
    if label not in trials:
        raise st.StudyError(f"study {study.study_name!r} has no trial {label}")
    return trials[label]


def record_doc(r: rec.TrialRecord) -> dict[str, Any]:
    """The typed record as one JSON-ready object: each stage record's document under its
    field name (``prescreen``, ``measured``, ... ``finished``, ``lineage``)."""
    docs = {"prescreen": r.prescreen, "measured": r.measured, "conversion": r.conversion,
            "derived": r.derived}
    return {"number": r.number, "state": r.state.name,
            "values": list(r.values) if r.values else None, "params": dict(r.params),
            "constraints": dict(r.constraints),
            "config": r.asked_config.to_dict() if r.asked_config else None,
            **{k: v.to_doc() if v is not None else None for k, v in docs.items()},
            "predicted": r.predicted,
            "step_budget": dict(r.step_budget.doc) if r.step_budget else None,
            "inheritance": dict(r.inheritance.doc) if r.inheritance else None,
            "rungs": [x.to_doc() for x in r.rungs], "attempts": [x.to_doc() for x in r.attempts],
            "finished": rec.attrs(r.finished), "lineage": rec.attrs(r.lineage)}


def _head_lines(label: str, r: rec.TrialRecord) -> list[str]:
    notes = "; ".join(n for n in (r.reason, disturbed_note(r)) if n)
    lines = [f"trial {label}: {r.state.name}" + (f" -- {notes}" if notes else "")]
    if r.derived is not None:
        detail = {k: v for k, v in r.derived.detail.items()  # scalars: the tables stay in --json
                  if k != "what" and not isinstance(v, (Mapping, list, tuple))}
        lines.append(f"derived ({r.derived.kind}) from trial {r.derived.source}: "
                     f"{r.derived.detail.get('what', r.derived.kind)} {_inline(detail)}")
    if r.values:
        lines.append("values: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, r.values)))
    if r.constraints:
        lines.append("constraints (> 0 violates): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in r.constraints.items()))
    lines.append("params: " + ", ".join(f"{k}={_cell(v)}" for k, v in sorted(r.params.items())))
    return lines


def _decision_lines(r: rec.TrialRecord) -> list[str]:
    """One line per stage before training: its answer, why, and the evidence."""
    lines = []
    if (p := r.prescreen) is not None:  # fields by their stored names: what users grep for
        evidence = {k: v for k, v in p.to_doc().items() if k not in ("decision", "reason")}
        lines.append(_decision("pre-screen", p.decision, p.reason, _inline(evidence)))
    if r.predicted is not None:
        lines.append(_decision("predicted", "", "", _inline(r.predicted)))
    if (m := r.measured) is not None:
        runs = f" over {len(m.samples_ms)} runs" if m.samples_ms else ""
        lines.append(_decision("measured", m.decision, m.reason,
                               f"latency {m.latency_ms:.4g} ms (spread {m.latency_spread:.1%}"
                               f"{runs}), memory train {m.train_mb:.4g} MB, sample "
                               f"{m.sample_mb:.4g} MB, {m.seconds:.1f} s"))
        lines += _trust_lines(m)
    if (c := r.conversion) is not None:
        ratio = f" (x{c.ratio:.3g})" if c.ratio is not None else ""
        lines.append(_decision("conversion", "", "", f"{c.measured_ms:.4g} ms on "
                               f"{c.device_class} = {c.latency_ms:.4g} ms on {c.target_device}"
                               + ratio))
    for name, held in (("step budget", r.step_budget), ("inheritance", r.inheritance)):
        if held is not None:
            lines.append(_decision(name, "", "", _inline(held.doc)))
    return lines


def _trust_lines(m: rec.Measured) -> list[str]:
    """How far the latency can be trusted: the steady protocol's interval, rounds and
    reference ratio, then each attempt when a disturbed latency was measured again."""
    lines = [_decision("latency", "", "", _trust(m.latency_ms, m.latency_ci, m.latency_rounds,
                                                 m.disturbed_rounds, m.reference_ratio,
                                                 m.disturbed))]
    for i, a in enumerate(m.latency_attempts):
        lines.append(_decision(f"  attempt {i + 1}", "", "", f"{a.get('at', '?')}: " + _trust(
            a["latency_ms"], a["latency_ci"], a["latency_rounds"], a["disturbed_rounds"],
            a["reference_ratio"], a["disturbed"]) + f", {a.get('seconds', 0.0):.1f} s"))
    return lines


def _trust(ms: float, ci: float, rounds: int, disturbed_rounds: int, ratio: float,
           disturbed: bool) -> str:
    mark = "DISTURBED (too few clean samples) " if disturbed else ""
    return (f"{mark}{ms:.4g} ms +-{ci:.1%} (95% CI of the median), {rounds} rounds "
            f"({disturbed_rounds} disturbed), reference x{ratio:.3g}")


def disturbed_note(r: rec.TrialRecord) -> str:
    """``latency disturbed (reference x1.8)`` for a trial whose latency had too few clean
    samples, even when measured again; empty otherwise."""
    m = r.measured
    if m is None or not m.disturbed:
        return ""
    again = ", also when re-measured" if m.latency_attempts else ""
    return f"latency disturbed (reference x{m.reference_ratio:.3g}{again})"


def _decision(stage: str, answer: str, reason: str, evidence: str) -> str:
    said = f"-> {answer}" + (f" ({reason})" if reason else "") + ": " if answer else ""
    return f"{stage:<12} {said}{evidence}"


def _rung_lines(r: rec.TrialRecord) -> list[str]:
    """Each rung with the attempt (and worker) it belongs to, and its answer."""
    workers = {a.attempt: a.worker for a in r.attempts}
    lines = []
    for rung in r.rungs:
        why = f" ({rung.reason})" if rung.reason else ""
        on = f" on {workers[rung.attempt]}" if rung.attempt in workers else ""
        lines.append(f"attempt {rung.attempt + 1}{on}, rung step {rung.step}: val_loss "
                     f"{rung.val_loss:.4f} (train {rung.train_loss:.4f}, "
                     f"{rung.elapsed_s:.1f} s, curve of {len(rung.history)}) -> "
                     f"{rung.decision}{why}")
    return lines


def _attempt_lines(r: rec.TrialRecord) -> list[str]:
    return [f"attempt {a.attempt + 1} on {a.worker}: {a.status}, "
            f"{max(0.0, a.ended - a.started):.1f} s" + (f" -- {a.reason}" if a.reason else "")
            for a in r.attempts]


def _result_lines(r: rec.TrialRecord) -> list[str]:
    f = r.finished
    lines = [f"quality: {_inline(f.quality)}"] if f.quality else []
    if f.device:
        lines.append(f"device: {_device(f.device)}"
                     + (f", class {f.device_class}" if f.device_class else "")
                     + (f", worker {f.worker}" if f.worker else ""))
    if f.artifacts:
        lines += [f"artifact: {name} {path}" for name, path in sorted(f.artifacts.items())]
    return lines


def _timing_lines(r: rec.TrialRecord) -> list[str]:
    timings = r.finished.timings or {}
    return [" ".join(f"{k} {_cell(round(float(v), 2))}" for k, v in timings.items())] \
        if timings else []


def _inline(doc: Mapping[str, Any]) -> str:
    """A record's fields on one line, numbers to 4 significant digits (JSON, so a field can
    be searched for by its stored name)."""
    return json.dumps(_rounded(doc), sort_keys=True, default=str)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _lineage_lines(lineage: rec.Lineage) -> list[str]:
    lines = []
    if lineage.requeued_from is not None:
        lines.append(f"re-runs the params of trial {lineage.requeued_from}")
    if lineage.parent is not None:
        lines.append(f"mutation of trial {lineage.parent}: {lineage.mutation or '?'}")
    if (d := lineage.adaptation) is not None:
        lines.append(f"adapted ({d.trigger}) from trial {d.parent} at its step {d.at_step}: "
                     f"{d.reason}; trains its {d.steps} steps left")
    if (into := lineage.adapted_into) is not None:
        lines.append(f"continued as trial {into.trial} ({into.trigger}: {into.change})")
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
             " ".join(f"{names[k]}={_cell(r.params.get(k))}" for k in keys) or "-",
             _summary(r)] for i, r in zip(order, records)]
    ref = ", ".join(f"{v:.4g}" for v in result.reference)
    head = (f"{int(result.on_front.sum())} non-dominated of {len(result.trials)} complete trials "
            f"({int((~result.feasible).sum())} infeasible); hypervolume {result.hypervolume:.4g} "
            f"w.r.t. ({ref})")
    derived = sum(label.startswith("d") for label in result.labels)
    if derived:
        head += f"; {derived} of them derived (d<n>: distilled, compressed or tuned)"
    return head + "\n" + _table(["trial", *OBJECTIVES, "fid floor", "weights", "differs",
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
