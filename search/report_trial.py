"""One trial's report in sections (``diffnas status --trial N``): head, the decisions before
training with their evidence, rungs, attempts, result, timings, wall time and lineage; and
its raw record as JSON (``--json``).

Everything is read through :mod:`search.storage.record`; a derived point (``d<n>``,
:mod:`search.derived.points`) reads like a trial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search import walltime
from search.derived.points import source
from search.report_format import cell, device_line, inline
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES


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
                     f"{r.derived.detail.get('what', r.derived.kind)} {inline(detail)}")
    if r.values:
        lines.append("values: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(OBJECTIVES, r.values)))
    if r.constraints:
        lines.append("constraints (> 0 violates): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in r.constraints.items()))
    lines.append("params: " + ", ".join(f"{k}={cell(v)}" for k, v in sorted(r.params.items())))
    return lines


def _decision_lines(r: rec.TrialRecord) -> list[str]:
    """One line per stage before training: its answer, why, and the evidence."""
    lines = []
    if (p := r.prescreen) is not None:  # fields by their stored names: what users grep for
        evidence = {k: v for k, v in p.to_doc().items() if k not in ("decision", "reason")}
        lines.append(_decision("pre-screen", p.decision, p.reason, inline(evidence)))
    if r.predicted is not None:
        lines.append(_decision("predicted", "", "", inline(r.predicted)))
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
            lines.append(_decision(name, "", "", inline(held.doc)))
    return lines


def _trust_lines(m: rec.Measured) -> list[str]:
    """How far the latency can be trusted: the steady protocol's interval, rounds and
    reference ratio, then each attempt when a disturbed latency was measured again."""
    lines = [_decision("latency", "", "", _trust(m.latency_ms, m.latency_ci, m.latency_rounds,
                                                 m.disturbed_rounds, m.reference_ratio,
                                                 m.disturbed, m.wait_share, m.reference_shift,
                                                 m.host_slowdown))]
    for i, a in enumerate(m.latency_attempts):
        lines.append(_decision(f"  attempt {i + 1}", "", "", f"{a.get('at', '?')}: " + _trust(
            a["latency_ms"], a["latency_ci"], a["latency_rounds"], a["disturbed_rounds"],
            a["reference_ratio"], a["disturbed"], a.get("wait_share", 0.0),
            a.get("reference_shift", 1.0), a.get("host_slowdown", 1.0))
            + f", {a.get('seconds', 0.0):.1f} s"))
    return lines


def _trust(ms: float, ci: float, rounds: int, disturbed_rounds: int, ratio: float,
           disturbed: bool, wait_share: float = 0.0, shift: float = 1.0,
           slowdown: float = 1.0) -> str:
    mark = "DISTURBED (too few clean samples, or too wide an interval) " if disturbed else ""
    waited = f", waited {wait_share:.0%} for the core" if wait_share else ""
    moved = f", host speed moved the reference x{shift:.3g}" if shift != 1.0 else ""
    scaled = (f", at the host's usual speed (it ran x{slowdown:.3g}: {ms * slowdown:.4g} ms as "
              "timed)") if slowdown != 1.0 else ""
    return (f"{mark}{ms:.4g} ms +-{ci:.1%} (95% CI of the median), {rounds} rounds "
            f"({disturbed_rounds} disturbed), reference x{ratio:.3g}{waited}{moved}{scaled}")


def disturbed_note(r: rec.TrialRecord) -> str:
    """``latency disturbed (reference x1.8, median +-4.1%)`` for a trial whose latency had
    too few clean samples, or too wide an interval, even when measured again; empty
    otherwise."""
    m = r.measured
    if m is None or not m.disturbed:
        return ""
    again = ", also when re-measured" if m.latency_attempts else ""
    return (f"latency disturbed (reference x{m.reference_ratio:.3g}, median +-{m.latency_ci:.1%}"
            f"{again})")


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
    lines = [f"quality: {inline(f.quality)}"] if f.quality else []
    if f.device:
        lines.append(f"device: {device_line(f.device)}"
                     + (f", class {f.device_class}" if f.device_class else "")
                     + (f", worker {f.worker}" if f.worker else ""))
    if f.artifacts:
        lines += [f"artifact: {name} {path}" for name, path in sorted(f.artifacts.items())]
    return lines


def _timing_lines(r: rec.TrialRecord) -> list[str]:
    timings = r.finished.timings or {}
    return [" ".join(f"{k} {cell(round(float(v), 2))}" for k, v in timings.items())] \
        if timings else []



def _lineage_lines(lineage: lin.Lineage) -> list[str]:
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
