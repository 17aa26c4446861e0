"""Live progress of a search: done, running, pruned and failed trials, the front's size,
hypervolume and ETA. A terminal gets a redrawn block; anything else gets plain log lines.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO


@dataclass(frozen=True)
class RunningTrial:
    number: int
    attempt: int
    worker: str
    phase: str
    pid: int | None  # the trial's child process
    worker_pid: int | None  # the worker (actor) process
    node_id: str  # the Ray node of the worker
    elapsed_s: float


@dataclass(frozen=True)
class Snapshot:
    """The coordinator's state after one loop iteration."""

    study: str
    target: int
    complete: int
    pruned: int
    failed: int
    running: tuple[RunningTrial, ...]
    queued: int
    workers: int
    front_size: int
    hypervolume: float
    elapsed_s: float
    eta_s: float | None
    messages: tuple[str, ...] = field(default=())

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


class Progress(Protocol):
    def update(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


def summary_line(s: Snapshot) -> str:
    eta = "--" if s.eta_s is None else _duration(s.eta_s)
    return (f"[{s.study}] {s.finished}/{s.target} finished (complete {s.complete}, pruned "
            f"{s.pruned}, failed {s.failed}) | running {len(s.running)} on {s.workers} workers"
            f" | front {s.front_size}, HV {s.hypervolume:.4g} | elapsed "
            f"{_duration(s.elapsed_s)}, ETA {eta}")


def _duration(seconds_f: float) -> str:
    seconds = round(seconds_f)
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


class LogLines:
    """Plain lines: every coordinator message, and the summary whenever a count changes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._last: tuple[int, ...] | None = None

    def update(self, snapshot: Snapshot) -> None:
        for message in snapshot.messages:
            print(message, file=self.stream, flush=True)
        key = (snapshot.complete, snapshot.pruned, snapshot.failed, len(snapshot.running),
               snapshot.workers)
        if key != self._last:
            self._last = key
            print(summary_line(snapshot), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class LiveDisplay:
    """A block redrawn in place (ANSI), at most a few times a second; messages scroll above."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self._lines = 0
        self._drawn = 0.0

    def update(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        if not snapshot.messages and now - self._drawn < self.interval_s:
            return
        self._drawn = now
        self._clear()
        for message in snapshot.messages:
            self.stream.write(message + "\n")
        block = [summary_line(snapshot)]
        block += [f"  trial {r.number:>4} try {r.attempt + 1}  {r.phase:<10} {r.worker:<24} "
                  f"{_duration(r.elapsed_s)}" for r in snapshot.running]
        self.stream.write("\n".join(block) + "\n")
        self.stream.flush()
        self._lines = len(block)

    def _clear(self) -> None:
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")

    def close(self) -> None:
        self.stream.flush()


class Silent:
    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self) -> None:
        pass


def for_stream(stream: TextIO | None = None) -> Progress:
    """The live display on a terminal, plain log lines otherwise."""
    stream = stream or sys.stderr
    return LiveDisplay(stream) if stream.isatty() else LogLines(stream)
