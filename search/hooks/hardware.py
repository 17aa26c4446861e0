"""Hardware-aware search: a latency table per device class, predicted latency before
dispatch, and every latency reported for the study's target device class.

Each worker measures a latency table of its device class (:mod:`engine.model.latency`,
:mod:`workers.table`) and sends it with its profile; each completed trial grows it. The
coordinator keeps the latest table of every class and

- predicts each candidate's sampling latency on the target class before dispatch, which
  the constraint pruner compares with ``[constraints] max_latency_ms`` at stage 0;
- converts a latency measured on another class to the target class, by the ratio of the
  two tables' predictions for that config, and records both numbers.

The target class is ``[study] target_device``, else the first class seen; the study keeps
it (user attr ``target_device``), so that a resumed study reports in the same terms.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from engine.config import Config
from engine.model.latency import LatencyTable, predict_latency_ms
from engine.sampling.adaptive import choose_budget, with_budget
from search.pruning.base import Cost
from search.run.pipeline import Context, Flight, Hook
from search.run.pool import Worker
from search.space import SearchSpace
from search.space_params import Param
from search.storage import record as rec
from workers.records import Measurement, TrialOutcome, TrialRequest, WorkerSetup

TARGET_DEVICE = "target_device"  # study user attr: the class whose latency is reported
TABLE_DIR = "latency-tables"  # under the results folder (on each worker's own disk)
MIN_CALIBRATION = 3


def calibration_configs(space: SearchSpace, channels: int) -> list[Config]:
    """Configs whose measured latency calibrates a worker's table: the ``i``-th takes the
    ``i``-th value of every searched parameter (cycling), so that every choice of the
    space shows up in some config; combinations that are not valid are skipped."""
    searched = [p for p in space.params if p.searched]
    values = {p.name: _spread(p) for p in searched}
    count = max([MIN_CALIBRATION, *(len(v) for v in values.values())])
    configs: list[Config] = []
    for i in range(count):
        raw = {p.name: p.encode(values[p.name][i % len(values[p.name])]) for p in searched}
        try:
            config = space.decode(raw, channels)
        except ValueError:
            continue
        if config not in configs:
            configs.append(config)
    return configs


def _spread(p: Param) -> list[Any]:
    if p.kind == "choice":
        return list(p.choices)
    middle = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    ends = [p.low, p.high, middle]
    return [round(v) for v in ends] if p.kind == "int" else ends


def worker_setup(space: SearchSpace, channels: int, results: Path) -> WorkerSetup | None:
    """What each worker prepares for this study (None: the space keeps no tables)."""
    if not space.study.latency_table:
        return None
    configs = tuple(c.to_dict() for c in calibration_configs(space, channels))
    return WorkerSetup(configs, str((results / TABLE_DIR).resolve()))


class Hardware:
    """The latest latency table of every device class, and the study's target class.

    Args:
        target: ``[study] target_device`` ("" = the first class seen).
        stored: the target a resumed study was reported for ("" = none yet).

    Raises:
        ValueError: ``target`` differs from the stored one.
    """

    def __init__(self, target: str = "", stored: str = "") -> None:
        if target and stored and target != stored:
            raise ValueError(f"target_device {target!r}: this study reports latency for "
                             f"{stored!r}; keep that, or start a new --study")
        self.explicit = bool(target)
        self.target = target or stored
        self.tables: dict[str, LatencyTable] = {}
        self.seen: set[str] = set()

    def learn(self, profile: dict[str, Any]) -> None:
        """A worker is ready: its class, and its table if it built one."""
        device_class = str(profile["device_class"])
        self.seen.add(device_class)
        self.target = self.target or device_class
        if profile.get("latency_table"):
            self.update(device_class, profile["latency_table"])

    def update(self, device_class: str, table: dict[str, Any]) -> None:
        """Replace the table of ``device_class`` by a newer one (a trial grew it)."""
        self.tables[device_class] = LatencyTable.from_dict(table)

    def waiting(self) -> bool:
        """A named target class has no ready worker yet (so nothing can be predicted for it).

        An unnamed target is the class of the first ready worker, learned before that
        worker's first trial is asked for.
        """
        return self.explicit and self.target not in self.seen

    def check_target(self, starting: int) -> None:
        """Fail when every worker is up and none is of the named target class.

        Raises:
            ValueError: naming the target and the classes there are.
        """
        if self.explicit and self.seen and not starting and self.target not in self.seen:
            raise ValueError(f"target_device {self.target!r}: no worker of that device class "
                             f"(classes here: {', '.join(sorted(self.seen))})")

    def predict(self, config: Config, device_class: str = "") -> float | None:
        """Predicted latency (ms) of ``config`` on a class (default: the target), or None
        when that class has no table or its table has no block of a kind to estimate from."""
        table = self.tables.get(device_class or self.target)
        if table is None:
            return None
        try:
            return predict_latency_ms(config, table)
        except KeyError:
            return None

    def predict_budgeted(self, config: Config, target_ms: float) -> float | None:
        """Predicted latency (ms) on the target class of the schedule a worker there would
        choose for ``target_ms`` (``--max-latency-ms``); None when it cannot be predicted.

        The cost of one evaluation and the sampler's overhead come from the predictions at
        1 and 2 steps, as a worker measures them; a target not even one step fits returns
        the one-step latency (over the target: infeasible).
        """
        one, two = (self.predict(replace(config, schedule=replace(
            config.schedule, sampler="ddim", spacing="trailing", timesteps=(), steps=n)))
            for n in (1, 2))
        if one is None or two is None:
            return None
        per_eval = max(two - one, 1e-6)
        try:
            budget = choose_budget(target_ms, per_eval, max(one - per_eval, 0.0))
        except ValueError:
            return one
        return self.predict(replace(config, schedule=with_budget(config.schedule, budget)))

    def ratio(self, config: Config, device_class: str) -> float | None:
        """Target latency over ``device_class`` latency for ``config`` (None: unknown)."""
        if device_class == self.target:
            return 1.0
        own, target = self.predict(config, device_class), self.predict(config)
        return None if own is None or target is None or own <= 0 else target / own

    def convert(self, config: Config, measured_ms: float, device_class: str
                ) -> dict[str, Any]:
        """A latency measured on ``device_class`` in target terms, with both numbers.

        Returns:
            ``{"device_class", "target_device", "measured_ms", "latency_ms", "ratio"}``;
            ``latency_ms`` is for the target class (unconverted, with ``note``, when either
            class has no table).
        """
        ratio = self.ratio(config, device_class)
        doc = {"device_class": device_class, "target_device": self.target,
               "measured_ms": measured_ms, "latency_ms": measured_ms * (ratio or 1.0),
               "ratio": ratio}
        if ratio is None:
            doc["note"] = f"not converted: no latency prediction for {device_class!r} or the target"
        elif device_class != self.target:
            doc["predicted_ms"] = self.predict(config, device_class)
            doc["predicted_target_ms"] = self.predict(config)
        return doc


class HardwareHook(Hook):
    """Latency tables in the pipeline: learn each worker's table, predict every candidate's
    latency on the target class before dispatch, ask a worker for the latency target in its
    own terms, and convert what it measured to the target class (the one conversion)."""

    def __init__(self, space: SearchSpace, study: optuna.Study,
                 latency_target_ms: float | None) -> None:
        self.hardware = Hardware(space.study.target_device,
                                 str(study.user_attrs.get(TARGET_DEVICE, "")))
        self.latency_target_ms = latency_target_ms
        self._learned: set[str] = set()

    def ready(self, ctx: Context) -> bool:
        """Take in every worker that came up; hold new trials until the target class's table
        is in, so that every candidate gets a prediction."""
        for worker in ctx.pool.workers.values():
            if worker.name not in self._learned:
                self._learned.add(worker.name)
                self.hardware.learn(worker.profile)
                if worker.profile.get("latency_error"):
                    ctx.say(f"{worker.name}: {worker.profile['latency_error']}")
        if self.hardware.target and TARGET_DEVICE not in ctx.study.user_attrs:
            ctx.study.set_user_attr(TARGET_DEVICE, self.hardware.target)
        self.hardware.check_target(ctx.pool.starting())
        return not self.hardware.waiting()

    def on_asked(self, ctx: Context, trial: optuna.Trial, config: Config, cost: Cost) -> Cost:
        """The latency predicted on the target class (with the schedule a latency target
        would choose there)."""
        hw = self.hardware
        predicted = (hw.predict(config) if self.latency_target_ms is None
                     else hw.predict_budgeted(config, self.latency_target_ms))
        return replace(cost, predicted_latency_ms=predicted, target_device=hw.target)

    def on_dispatch(self, ctx: Context, flight: Flight, worker: Worker,
                    request: TrialRequest) -> TrialRequest:
        """The study's latency target in the terms of ``worker``'s device class."""
        if self.latency_target_ms is None:
            return request
        ratio = self.hardware.ratio(flight.config, _device_class(worker))
        return replace(request, latency_target_ms=self.latency_target_ms / (ratio or 1.0))

    def on_measured(self, ctx: Context, flight: Flight, worker: Worker, m: Measurement
                    ) -> Measurement:
        """The measurement in target-class terms; both numbers are recorded."""
        conversion = rec.Conversion.from_doc(
            self.hardware.convert(flight.config, m.latency_ms, _device_class(worker)))
        flight.conversion = conversion
        rec.write(flight.trial, conversion)
        ratio = conversion.latency_ms / m.latency_ms if m.latency_ms > 0 else 1.0
        return replace(m, latency_ms=conversion.latency_ms,
                       latency_samples_ms=tuple(v * ratio for v in m.latency_samples_ms))

    def on_result(self, ctx: Context, flight: Flight, outcome: TrialOutcome,
                  worker: Worker | None) -> None:
        """A completed trial grew its worker's table."""
        if outcome.latency_table and worker is not None:
            self.hardware.update(_device_class(worker), outcome.latency_table)


def _device_class(worker: Worker) -> str:
    return str(worker.profile.get("device_class", ""))
