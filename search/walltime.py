"""Where a study's device time went: per phase over its trials, and how busy its workers were.

A trial's breakdown is its :class:`workers.records.WallTime`; a worker's own costs (its start
and latency table) are :class:`search.storage.record.WorkerTime`. Two shares summarise a
study:

- overhead share: everything but training steps and FID sampling, over the trials' wall time;
- busy share: the trials' wall time over ``workers x`` the study's wall time (from the first
  worker's start to the last attempt's end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna

from search.storage import record as rec
from search.storage import timing as stored_time
from workers.records import WALL_PHASES, WallTime


@dataclass(frozen=True)
class Summary:
    """A study's wall time, summed per phase over the trials that recorded one."""

    trials: int
    phases: dict[str, float]  # phase -> seconds summed over the trials
    wall_s: float  # the trials' wall time, summed
    queued_s: float  # the workers' idle time between trials, summed
    answers_s: float  # of idle_s: the trials' waits for the coordinator's answers, summed
    workers: tuple[stored_time.WorkerTime, ...]
    worker_count: int
    study_wall_s: float

    @property
    def overhead_share(self) -> float:
        """Everything but training steps and FID sampling, as a share of the trials' wall."""
        core = self.phases["train_s"] + self.phases["fid_s"]
        return (self.wall_s - core) / self.wall_s if self.wall_s else 0.0

    @property
    def busy_share(self) -> float:
        """The trials' wall time over ``workers x`` the study's wall time."""
        capacity = self.worker_count * self.study_wall_s
        return self.wall_s / capacity if capacity else 0.0

    def mean(self, phase: str) -> float:
        """Mean seconds of ``phase`` per trial."""
        return self.phases[phase] / self.trials if self.trials else 0.0


def summarize(study: optuna.Study) -> Summary | None:
    """The study's :class:`Summary`; None when no trial recorded a breakdown."""
    records = [rec.read(t) for t in study.get_trials(deepcopy=False)]
    times = [r.walltime for r in records if r.walltime is not None]
    if not times:
        return None
    workers = tuple(stored_time.read_workers(study))
    attempts = [a for r in records for a in r.attempts]
    starts = [w.started_at for w in workers if w.started_at] + [a.started for a in attempts]
    study_wall = max((a.ended for a in attempts), default=0.0) - min(starts, default=0.0)
    count = len(workers) or len({a.worker for a in attempts})
    return Summary(len(times), _sums(times), sum(t.wall_s for t in times),
                   sum(t.queued_s for t in times), sum(t.answers_s for t in times), workers,
                   count, max(0.0, study_wall))


def _sums(times: Sequence[WallTime]) -> dict[str, float]:
    return {p: sum(getattr(t, p) for t in times) for p in WALL_PHASES}


def _name(phase: str) -> str:
    return phase.removesuffix("_s")


def summary_line(s: Summary) -> str:
    """One line for ``diffnas status``: the shares, then seconds per phase over all trials."""
    spent = ", ".join(f"{_name(p)} {v:.0f}" for p, v in s.phases.items())
    return (f"wall time: {s.trials} trials, {s.wall_s:.0f} s; overhead "
            f"{100 * s.overhead_share:.0f}% (all but train and fid); workers busy "
            f"{100 * s.busy_share:.0f}% of {s.worker_count} x {s.study_wall_s:.0f} s; "
            f"per phase (s): {spent} (idle: coordinator answers {s.answers_s:.0f}, device "
            f"lock {s.phases['idle_s'] - s.answers_s:.0f}); idle between trials {s.queued_s:.0f}")


def trial_lines(t: WallTime) -> list[str]:
    """The ``wall time`` section of ``diffnas status --trial``."""
    spent = ", ".join(f"{_name(p)} {v:.2f}" for p, v in t.phases().items())
    share = 100 * t.overhead_s / t.wall_s if t.wall_s else 0.0
    head = (f"{t.wall_s:.1f} s ({t.mode or '?'} start), overhead {t.overhead_s:.1f} s "
            f"({share:.0f}%): {spent}")
    return [head, (f"idle: coordinator answers {t.answers_s:.2f} s, device lock "
                  f"{t.idle_s - t.answers_s:.2f} s; worker idle before it: {t.queued_s:.1f} s")]


def table(s: Summary) -> str:
    """A markdown table: mean seconds per trial and share of wall time, per phase."""
    rows = [f"| {_name(p)} | {s.mean(p):.2f} | {100 * v / s.wall_s if s.wall_s else 0:.1f}% |"
            for p, v in s.phases.items()]
    workers = [f"| worker {w.worker} ({w.mode}) | start {w.actor_start_s:.1f} s, latency "
               f"table {w.table_s:.1f} s | |" for w in s.workers]
    shares = (f"trials: {s.trials}; overhead share (all but train and fid): "
              f"{100 * s.overhead_share:.1f}%; worker busy share: {100 * s.busy_share:.1f}% "
              f"({s.worker_count} workers x {s.study_wall_s:.0f} s)")
    return "\n".join(["| phase | mean s / trial | share of trial wall |", "|---|---|---|",
                      *rows, f"| **trial wall** | {s.wall_s / s.trials:.2f} | 100% |",
                      (f"| of idle: coordinator answers | {s.answers_s / s.trials:.2f} | "
                      f"{100 * s.answers_s / s.wall_s if s.wall_s else 0:.1f}% |"),
                      f"| idle between trials | {s.queued_s / s.trials:.2f} | |", *workers,
                      "", shares])
