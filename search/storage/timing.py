"""Where device time went, as the study stores it: a trial's last attempt's
:class:`workers.records.WallTime` (under ``walltime``) and each worker's own costs
(:class:`WorkerTime`, once per worker on the study, under ``worker_walltime:<worker>``).
``search.walltime`` sums them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import optuna

from workers.records import WallTime

WALLTIME = "walltime"
WORKER_TIME = "worker_walltime:"  # + worker name: a study user attribute


def read_walltime(doc: Mapping[str, Any] | None) -> WallTime | None:
    """A stored :class:`workers.records.WallTime` (keys it does not know are dropped)."""
    if doc is None:
        return None
    names = {f.name for f in fields(WallTime)}
    return WallTime(**{k: v for k, v in doc.items() if k in names})


@dataclass(frozen=True)
class WorkerTime:
    """A worker's own costs, once per worker: ``started_at`` (its process start, epoch
    seconds), ``actor_start_s`` (from then to ready), ``table_s`` (building or loading its
    latency table) and ``mode`` (``spawn`` or ``fork``: how it starts trial processes)."""

    worker: str
    started_at: float = 0.0
    actor_start_s: float = 0.0
    table_s: float = 0.0
    mode: str = ""


def write_worker(study: optuna.Study, worker: WorkerTime) -> None:
    """Store ``worker``'s costs on the study (the coordinator, when the worker is ready)."""
    doc = dataclasses.asdict(worker)
    study.set_user_attr(WORKER_TIME + doc.pop("worker"), doc)


def read_workers(study: optuna.Study) -> list[WorkerTime]:
    """Every worker's stored costs, by name."""
    names = {f.name for f in fields(WorkerTime)}
    return [WorkerTime(key[len(WORKER_TIME):], **{k: v for k, v in doc.items() if k in names})
            for key, doc in sorted(study.user_attrs.items()) if key.startswith(WORKER_TIME)]
