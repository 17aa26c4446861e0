"""diffnas workers: one Ray actor per device; each trial runs in a child process.

Importing this package imports neither ray nor mlx; the actor class is built on demand
by :func:`start_worker`, and the child process imports ``engine`` first.
"""

import os

# Ray reports usage statistics over the network unless told not to; these machines reach
# no network beyond the package registries. Under `uv run`, Ray would also rebuild the
# environment for every worker process (about 20 s each start): keep the one we run in.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from workers.actor import RESOURCE, DeviceWorker, device_profile, start_worker
from workers.records import (
    OBJECTIVES,
    DataPayload,
    Decision,
    Event,
    EventKind,
    Measurement,
    Outcome,
    Parent,
    RungReport,
    TrialOutcome,
    TrialRequest,
    WorkerSetup,
)

__all__ = [
    "OBJECTIVES",
    "RESOURCE",
    "DataPayload",
    "Decision",
    "DeviceWorker",
    "Event",
    "EventKind",
    "Measurement",
    "Outcome",
    "Parent",
    "RungReport",
    "TrialOutcome",
    "TrialRequest",
    "WorkerSetup",
    "device_profile",
    "start_worker",
]
