"""The recorded table, read for replay: rows, the nearest recorded config, feasibility,
and what one trial costs when it stops at a stage.

A proposal that is not in the table maps to the nearest recorded config by a Gower
distance over the searched parameters (Gower 1971): a categorical parameter adds 0 or 1,
a numeric one ``|a - b| / range`` (in log space for a log-scaled one); the sum is divided
by the number of parameters. Ties go to the lower id.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from search.pruning.base import Cost, constraint_values, proxy_group
from search.space import SearchSpace, load_space
from search.space_params import Param
from workers.records import OBJECTIVES, Measurement, RungReport


class TableError(ValueError):
    """The table cannot be replayed; the message names the file (and line)."""


@dataclass(frozen=True)
class Row:
    """One recorded config: what each stage reported, and the CPU-seconds of its process
    when it got there (``rung_cpu[i]`` at ``rungs[i]``)."""

    id: int
    params: dict[str, Any]
    status: str  # completed | failed | pruned (the worker's own limit)
    cost: Cost
    measurement: Measurement | None
    cpu_measured: float
    rungs: tuple[RungReport, ...]
    rung_cpu: tuple[float, ...]
    cpu_end: float
    values: tuple[float, ...] | None  # OBJECTIVES, when completed


LATER_SETTINGS = {"latency_rounds": 6}
"""``[evaluate]`` settings added after the recordings, with the value they ran at."""


def params_fingerprint(space: SearchSpace) -> str:
    """What defines the recorded configs: the searched and fixed parameters, data,
    evaluation and rungs -- not the constraint limits, which only the replay applies."""
    doc = json.loads(space.fingerprint())
    doc.pop("constraints")
    for key, value in LATER_SETTINGS.items():  # at the value every recording ran with
        if doc["evaluate"].get(key) == value:
            doc["evaluate"].pop(key)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _row(doc: dict[str, Any]) -> Row:
    m = doc["measurement"]
    measurement = None if m is None else Measurement(
        float(m["latency_ms"]), float(m["latency_spread"]), tuple(m["latency_samples_ms"]),
        float(m["train_mb"]), float(m["sample_mb"]), float(m["seconds"]))
    rungs = tuple(RungReport(int(r["step"]), float(r["val_loss"]), float(r["train_loss"]),
                             float(r["elapsed_s"])) for r in doc["rungs"])
    values = doc["values"]
    cpu = doc["cpu_s"]
    return Row(int(doc["id"]), doc["params"], doc["status"],
               Cost(int(doc["cost"]["params"]), int(doc["cost"]["flops"]),
                    int(doc["cost"]["train_steps"])),
               measurement, float(cpu["measured"] or 0.0), rungs,
               tuple(float(r["cpu_s"]) for r in doc["rungs"]), float(cpu["end"] or 0.0),
               tuple(float(values[k]) for k in OBJECTIVES) if values else None)


def read_rows(path: Path) -> tuple[list[Row], bool]:
    """The rows of a results file, and whether any is marked synthetic.

    Raises:
        TableError: unreadable, a line that is not a complete row (named by line number).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise TableError(f"{path}: {err}") from None
    rows, synthetic = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            rows.append(_row(doc))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise TableError(f"{path}:{number}: not a table row ({type(err).__name__}: "
                             f"{err})") from None
        synthetic |= bool(doc.get("synthetic"))
    if not rows:
        raise TableError(f"{path}: no rows (record the table first: record.py)")
    return rows, synthetic


def _grouped(row: Row, space: SearchSpace) -> Row:
    """``row`` with the proxy group in its cost, as the coordinator's stage 0 fills it in."""
    cost = replace(row.cost, proxy_group=proxy_group(space.decode(row.params)))
    return replace(row, cost=cost)


class Table:
    """The rows of one table on one frozen space, with nearest-config lookup."""

    def __init__(self, rows: list[Row], space: SearchSpace, synthetic: bool = False) -> None:
        self.rows = sorted((_grouped(r, space) for r in rows), key=lambda r: r.id)
        self.space = space
        self.synthetic = synthetic
        self.limits = space.constraints.limits()
        searched = [p for p in space.params if p.searched]
        self.categorical = [p for p in searched if p.kind == "choice"]
        self.numeric = [p for p in searched if p.kind != "choice"]
        self.cats = np.array([[self._code(p, r.params[p.name]) for p in self.categorical]
                              for r in self.rows], float).reshape(len(self.rows), -1)
        self.nums = np.array([[self._scale(p, r.params[p.name]) for p in self.numeric]
                              for r in self.rows], float).reshape(len(self.rows), -1)

    @staticmethod
    def _code(p: Param, value: Any) -> int:
        encoded = [p.encode(c) for c in p.choices]
        return encoded.index(value) if value in encoded else -1

    @staticmethod
    def _scale(p: Param, value: Any) -> float:
        """``value`` in [0, 1] over the parameter's range (log space when log-scaled)."""
        lo, hi, x = float(p.low), float(p.high), float(value)
        if p.log:
            lo, hi, x = math.log(lo), math.log(hi), math.log(x)
        return (x - lo) / (hi - lo) if hi > lo else 0.0

    def distances(self, params: dict[str, Any]) -> np.ndarray:
        """``(n,)`` Gower distances from ``params`` to every row."""
        cats = np.array([self._code(p, params[p.name]) for p in self.categorical], float)
        nums = np.array([self._scale(p, params[p.name]) for p in self.numeric], float)
        total = (self.cats != cats).sum(axis=1) + np.abs(self.nums - nums).sum(axis=1)
        return np.asarray(total / max(len(self.categorical) + len(self.numeric), 1))

    def nearest(self, params: dict[str, Any]) -> tuple[int, float]:
        """Index of the nearest recorded row (lowest id on a tie), and its distance."""
        d = self.distances(params)
        i = int(np.argmin(d))
        return i, float(d[i])

    def known(self, row: Row, measured: bool) -> dict[str, float]:
        """The constraint inputs known at stage 0, or after the measurement too."""
        values = {"params": float(row.cost.params), "flops": float(row.cost.flops)}
        if measured and row.measurement is not None:
            values.update(latency_ms=row.measurement.latency_ms,
                          memory_mb=row.measurement.memory_mb(self.space.evaluate.memory))
        return values

    def violations(self, row: Row, measured: bool = True) -> dict[str, float]:
        """Constraint values (> 0 violates) of what is known of ``row``."""
        return constraint_values(self.known(row, measured), self.limits)

    def feasible(self, row: Row) -> bool:
        return all(v <= 0 for v in self.violations(row).values())

    def points(self) -> np.ndarray:
        """``(n, 3)`` objective values of the completed feasible rows."""
        pts = [r.values for r in self.rows if r.values is not None and self.feasible(r)]
        return np.array(pts, float).reshape(-1, len(OBJECTIVES))

    def full_cost(self) -> float:
        """The median device-seconds of a trial trained to the end."""
        return float(np.median([r.cpu_end for r in self.rows if r.status == "completed"]))


def load_table(results: Path, space_path: Path, plan_path: Path | None = None) -> Table:
    """The table of ``results`` on the space file ``space_path``.

    Raises:
        TableError: the results cannot be read, or were recorded on other parameters than
            the space file defines (checked against ``plan_path``'s fingerprint).
    """
    space = load_space(space_path)
    rows, synthetic = read_rows(results)
    if plan_path is not None and plan_path.is_file():
        planned = json.loads(plan_path.read_text()).get("params_fingerprint")
        if planned not in (None, params_fingerprint(space)):
            raise TableError(f"{space_path}: its parameters differ from those {plan_path} "
                             "was planned on (only [constraints] may change after recording)")
    return Table(rows, space, synthetic)
