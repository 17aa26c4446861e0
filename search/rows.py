"""Machine-readable rows of a study: ``diffnas pareto --json`` and ``--csv``.

One row per trial or derived point (``d<n>``), read through the trial record
(:mod:`search.storage.record`). The JSON document's shape is :data:`SCHEMA` (a JSON
Schema, draft 2020-12), versioned by :data:`SCHEMA_VERSION`; the README's table of fields
is :data:`ROW_FIELDS` and :data:`DOC_FIELDS`. A change that removes or retypes a field
raises the version; adding a field does not.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.derived.points import companion
from search.report import Front
from search.storage import record as rec
from search.storage import study as st
from workers.records import OBJECTIVES

SCHEMA_VERSION = 1

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}

ROW_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "id": ({"type": "string", "pattern": "^d?[0-9]+$"},
           'trial number ("3") or derived point ("d0"), as `diffnas status --trial` takes it'),
    "kind": ({"enum": ["trial", "derived"]}, "a search trial, or a derived point"),
    "number": ({"type": "integer"}, ("the trial's number in its study (the companion study "
               "`<study>-derived` for a derived point)")),
    "state": ({"enum": [s.name for s in TrialState]}, "Optuna trial state"),
    "on_front": ({"type": "boolean"}, ("non-dominated among feasible COMPLETE trials and "
                 "derived points")),
    "feasible": ({"type": "boolean"}, "no recorded constraint is violated"),
    "fid": (_NUMBER_OR_NULL, ("objective: FID against the feature network (null unless "
            "COMPLETE)")),
    "latency_ms": (_NUMBER_OR_NULL, ("objective: sampling latency, ms per image at batch 1, "
                   "in target-device terms")),
    "peak_mem_mb": (_NUMBER_OR_NULL, "objective: peak memory, MB"),
    "fid_floor": (_NUMBER_OR_NULL, ("real-vs-real FID at the same sample count (the best "
                  "FID can get)")),
    "params": ({"type": "object", "additionalProperties": {
        "type": ["string", "number", "boolean", "null"]}},
        "every sampled parameter, by its space name (`unet.base_width`, ...)"),
    "device_class": (_STRING_OR_NULL, ("device class of the worker that measured it (a "
                     "derived point: its source's)")),
    "artifacts": ({"type": "object", "additionalProperties": {"type": "string"}},
                  "file name -> path of its stored files (checkpoint, samples.png, ...)"),
    "derived_from": (_STRING_OR_NULL, ("a derived point's source (`3` or `d0`); null for "
                     "a trial")),
    "reason": ({"type": "string"}, ("why it was pruned, failed or is infeasible (may be "
               "empty)")),
    "latency_disturbed": ({"type": ["boolean", "null"]}, ("the latency had too few clean "
                          "samples, or their median's 95% interval stayed wider than +-5% "
                          "to the last round, even when measured again (another process took "
                          "the CPU, or the host's speed kept moving); null: not measured. "
                          "Optional: absent from older documents")),
}
"""Each row's fields: JSON Schema of the value, and its meaning (the README's table)."""

OPTIONAL_ROW_FIELDS = frozenset({"latency_disturbed"})
"""Row fields added after version 1: not required, so that older documents still validate."""

DOC_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "schema_version": ({"const": SCHEMA_VERSION}, "this schema's version"),
    "study": ({"type": "string"}, "the study's name"),
    "scope": ({"enum": ["front", "all"]}, "`front` (default) or `all` (`--all`)"),
    "objectives": ({"type": "array", "items": {"type": "string"}},
                   "objective names, all minimised"),
    "reference": ({"type": "array", "items": {"type": "number"}},
                  "hypervolume reference point (empty with no feasible point)"),
    "hypervolume": ({"type": "number"}, "of the front w.r.t. `reference`"),
    "rows": ({"type": "array", "items": {"$ref": "#/$defs/row"}}, ("one per trial or "
             "derived point; the front sorted by FID, `--all` by id")),
}
"""The document's top-level fields."""

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "diffnas pareto --json",
    "type": "object",
    "required": list(DOC_FIELDS),
    "properties": {name: spec for name, (spec, _) in DOC_FIELDS.items()},
    "$defs": {"row": {
        "type": "object",
        "required": [name for name in ROW_FIELDS if name not in OPTIONAL_ROW_FIELDS],
        "properties": {name: spec for name, (spec, _) in ROW_FIELDS.items()},
    }},
}
"""The JSON Schema of ``diffnas pareto --json`` output."""


def rows(study: optuna.Study, result: Front, everything: bool = False) -> list[dict[str, Any]]:
    """The front's rows sorted by FID, or (``everything``) every trial and derived point.

    Args:
        study: the search study (its derived points are read from its companion study).
        result: :func:`search.report.front` of ``study``.
        everything: every trial in any state, not just the front.

    Returns:
        Dicts with the fields of :data:`ROW_FIELDS`, in that order.
    """
    extra = companion(study)
    labelled = [(str(t.number), t) for t in study.get_trials(deepcopy=False)]
    labelled += [(f"d{t.number}", t) for t in (extra.get_trials(deepcopy=False) if extra else [])]
    on_front = {label for label, on in zip(result.labels, result.on_front) if on}
    out = [_row(label, t, label in on_front) for label, t in labelled]
    classes = {r["id"]: r["device_class"] for r in out}
    for r in out:
        if r["device_class"] is None and r["derived_from"] is not None:
            r["device_class"] = classes.get(r["derived_from"])
    if everything:
        return out
    return sorted((r for r in out if r["on_front"]), key=lambda r: r["fid"])


def _row(label: str, trial: FrozenTrial, on_front: bool) -> dict[str, Any]:
    r = rec.read(trial)
    values = r.values if r.complete and r.values else (None,) * len(OBJECTIVES)
    floor = (r.finished.quality or {}).get("fid_floor")
    return {"id": label, "kind": "derived" if label.startswith("d") else "trial",
            "number": r.number, "state": r.state.name, "on_front": on_front,
            "feasible": st.feasible(trial),
            **{name: None if v is None else float(v) for name, v in zip(OBJECTIVES, values)},
            "fid_floor": None if floor is None else float(floor), "params": dict(r.params),
            "device_class": r.finished.device_class or None,
            "artifacts": dict(r.finished.artifacts or {}),
            "derived_from": r.derived.source if r.derived is not None else None,
            "reason": r.reason,
            "latency_disturbed": r.measured.disturbed if r.measured is not None else None}


def document(study: optuna.Study, result: Front, everything: bool = False) -> dict[str, Any]:
    """The ``--json`` document: the study, the hypervolume and :func:`rows` (see :data:`SCHEMA`)."""
    return {"schema_version": SCHEMA_VERSION, "study": study.study_name,
            "scope": "all" if everything else "front", "objectives": list(OBJECTIVES),
            "reference": [float(v) for v in result.reference],
            "hypervolume": float(result.hypervolume), "rows": rows(study, result, everything)}


def to_json(doc: Mapping[str, Any]) -> str:
    """``doc`` as indented JSON (NaN written as null, so any JSON reader takes it)."""
    return json.dumps(_no_nan(doc), indent=2)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def to_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV: the scalar fields, then one column per parameter (``params.<name>``) and
    per artifact (``artifacts.<file>``) that any row has; empty cells for none."""
    nested = ("params", "artifacts")
    columns = [name for name in ROW_FIELDS if name not in nested]
    for key in nested:
        columns += [f"{key}.{n}" for n in sorted({n for r in table for n in r[key]})]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for r in table:
        flat = {k: v for k, v in r.items() if k not in nested}
        for key in nested:
            flat.update({f"{key}.{n}": v for n, v in r[key].items()})
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    return out.getvalue()


def fields_table() -> str:
    """The README's table of fields (Markdown), generated from :data:`SCHEMA`."""
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for prefix, table in (("", DOC_FIELDS), ("rows[].", ROW_FIELDS)):
        lines += [f"| `{prefix}{name}` | {_type(spec)} | {text} |"
                  for name, (spec, text) in table.items()]
    return "\n".join(lines)


def _type(spec: Mapping[str, Any]) -> str:
    if "const" in spec:
        return f"`{spec['const']}`"
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    kind = spec.get("type", "object")
    return " or ".join(kind) if isinstance(kind, list) else kind
