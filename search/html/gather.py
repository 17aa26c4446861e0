"""The report's data: one JSON-ready document gathered from a study and its derived points.

Everything the page shows is in here, so the page itself only draws; what a trial stored
is read through :mod:`search.storage.record`, the front and its hypervolume through
:func:`search.report.front`. Times are seconds since the study's first recorded event.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search import pareto, report
from search.derived.points import companion
from search.html.thumbs import thumbnail
from search.report_trial import disturbed_note
from search.storage import artifacts
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES

PHASES = ("measure_s", "train_s", "eval_s")  # the worker's timings, in the order they run


def gather(study: optuna.Study, results: Path) -> dict[str, Any]:
    """The report's document: the front, every trial and point, curves, the run's timeline.

    Args:
        study: the search study (its companion study's derived points join the front).
        results: the results folder, where sample grids are looked for when the stored
            artifact path does not exist here (a study moved or read from elsewhere).

    Returns:
        A JSON-serialisable dict; see ``report.html`` for how each key is drawn.
    """
    front = report.front(study, st.stored_space(study))
    entries = _entries(study)
    t0 = _origin(entries)
    rows = [_row(t, label, front, study.study_name, results) for t, label in entries]
    return {
        "study": study.study_name, "objectives": list(OBJECTIVES),
        "generated": datetime.now().isoformat(timespec="seconds"),
        "reference": list(front.reference), "hypervolume": front.hypervolume,
        "target": study.user_attrs.get("target"), "trials": rows,
        "curves": [c for t, label in entries if (c := curve(rec.read(t), label))],
        "hypervolume_over_time": hypervolume_over_time(front, t0),
        "timeline": timeline([(rec.read(t), label) for t, label in entries], t0)}


def _entries(study: optuna.Study) -> list[tuple[FrozenTrial, str]]:
    """Every trial (``"3"``) and derived point (``"d0"``), each with its label."""
    extra = companion(study)
    out = [(t, str(t.number)) for t in study.get_trials(deepcopy=False)]
    return out + [(t, f"d{t.number}") for t in (extra.get_trials(deepcopy=False) if extra
                                                 else [])]


def _origin(entries: Sequence[tuple[FrozenTrial, str]]) -> float:
    """The earliest start of any attempt or trial (epoch seconds); 0 for an empty study."""
    starts = [a.started for t, _ in entries for a in rec.read(t).attempts]
    starts += [t.datetime_start.timestamp() for t, _ in entries if t.datetime_start]
    return min(starts, default=0.0)


def _row(trial: FrozenTrial, label: str, front: report.Front, study: str,
         results: Path) -> dict[str, Any]:
    r = rec.read(trial)
    f = r.finished
    index = front.labels.index(label) if label in front.labels else None
    return {
        "label": label, "kind": "derived" if r.derived else "trial", "state": r.state.name,
        "values": dict(zip(OBJECTIVES, r.values)) if r.values else None,
        "feasible": r.feasible, "on_front": bool(front.on_front[index]) if index is not None
        else False, "params": dict(r.params), "fid_floor": (f.quality or {}).get("fid_floor"),
        "quality": dict(f.quality or {}), "device_class": f.device_class or None,
        "worker": f.worker or None, "wall_s": (f.timings or {}).get("wall_s"),
        "reason": "; ".join(n for n in (r.reason, disturbed_note(r)) if n),
        "lineage": lineage(r),
        "thumb": _thumb(r, label, study, results)}


def lineage(r: rec.TrialRecord) -> dict[str, Any]:
    """Where a trial came from and went: parent and mutation, adaptation, derivation."""
    a, into = r.lineage.adaptation, r.lineage.adapted_into
    return {"parent": r.lineage.parent, "mutation": r.lineage.mutation or None,
            "adaptation": None if a is None else
            f"{a.trigger} from trial {a.parent} at step {a.at_step}: {a.reason}",
            "adapted_into": None if into is None else
            f"trial {into.trial} ({into.trigger}: {into.change})",
            "derived_from": None if r.derived is None else r.derived.source,
            "derivation": None if r.derived is None else r.derived.summary(),
            "requeued_from": r.lineage.requeued_from}


def _thumb(r: rec.TrialRecord, label: str, study: str, results: Path) -> str | None:
    """The sample grid as a data URL; the stored path first, then the results folder."""
    stored = (r.finished.artifacts or {}).get("samples.png")
    candidates = [Path(stored)] if stored else []
    if not label.startswith("d"):
        candidates.append(artifacts.trial_dir(results, study, r.number) / "samples.png")
    found = next((p for p in candidates if p.is_file()), None)
    try:
        return None if found is None else thumbnail(found)
    except OSError:  # an unreadable grid costs its picture, not the whole report
        return None


def curve(r: rec.TrialRecord, label: str) -> dict[str, Any] | None:
    """The validation loss of a trial's last attempt: every ``eval_every`` point and rung,
    and the rungs that stopped it (pruned or adapted) with their reasons."""
    last = max((g.attempt for g in r.rungs), default=None)
    rungs = [g for g in r.rungs if g.attempt == last]
    if not rungs:
        return None
    points = {step: loss for g in rungs for step, loss in g.history}
    points.update({g.step: g.val_loss for g in rungs})
    stops = [{"step": g.step, "val_loss": g.val_loss, "decision": g.decision,
              "reason": g.reason} for g in rungs if g.decision != "continue"]
    return {"label": label, "state": r.state.name, "points": sorted(points.items()),
            "rungs": [g.step for g in rungs], "stops": stops}


def hypervolume_over_time(front: report.Front, t0: float) -> list[dict[str, Any]]:
    """After each feasible complete trial or point, in completion order, the hypervolume of
    those so far against the front's reference point (the last equals the front's)."""
    done = [(t.datetime_complete.timestamp(), i) for i, t in enumerate(front.trials)
            if front.feasible[i] and t.datetime_complete is not None]
    out, seen = [], []
    for when, i in sorted(done):
        seen.append(i)
        hv = pareto.hypervolume(front.points[seen], front.reference) if front.reference else 0.0
        out.append({"t": when - t0, "hypervolume": float(hv), "label": front.labels[i]})
    return out


def timeline(records: Sequence[tuple[rec.TrialRecord, str]], t0: float
             ) -> list[dict[str, Any]]:
    """Per worker, its attempts split into phases, and the idle gaps between them.

    A finished attempt's timings give the measure, train and eval phases; they end where
    the attempt ends, and what comes before them is ``setup`` (process start, data, model
    build). An attempt without timings (crashed, retried) is one ``attempt`` segment.
    """
    lanes: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r, label in records:
        for a in r.attempts:
            timings = r.finished.timings if a.attempt == len(r.attempts) - 1 else None
            lanes[a.worker] += _phases(a, label, timings, t0)
    return [{"worker": w, **_idle(sorted(lanes[w], key=lambda s: s["start"]))}
            for w in sorted(lanes)]


def _phases(a: rec.Attempt, label: str, timings: Any, t0: float) -> list[dict[str, Any]]:
    start, end = a.started - t0, a.ended - t0
    spans = [(p[:-2], float(timings[p])) for p in PHASES if timings and p in timings]
    if not spans or a.status != "completed":
        return [_segment(label, "attempt", start, end, a.status)]
    # The worker's clock and the coordinator's differ slightly: fit the phases in the attempt.
    scale = min(1.0, (end - start) / max(sum(s for _, s in spans), 1e-9))
    at = end - scale * sum(s for _, s in spans)
    out = [_segment(label, "setup", start, at, a.status)]
    for name, seconds in spans:
        out.append(_segment(label, name, at, at + scale * seconds, a.status))
        at += scale * seconds
    return out


def _segment(label: str, phase: str, start: float, end: float, status: str) -> dict[str, Any]:
    return {"trial": label, "phase": phase, "start": start, "end": max(start, end),
            "status": status}


def _idle(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds the gaps between a worker's first start and last end, and its busy fraction."""
    if not segments:
        return {"segments": [], "busy": 0.0}
    gaps, edge = [], segments[0]["start"]
    for s in segments:
        if s["start"] > edge:
            gaps.append(_segment("", "idle", edge, s["start"], ""))
        edge = max(edge, s["end"])
    span = edge - segments[0]["start"]
    idle = sum(g["end"] - g["start"] for g in gaps)
    return {"segments": segments + gaps, "busy": 1.0 - idle / span if span > 0 else 1.0}
