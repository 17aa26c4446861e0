"""Live progress of a search: done, running, queued, pruned and failed trials, the front's
size, hypervolume and ETA. A terminal gets a redrawn block; anything else gets plain log
lines. Before the first trial, each setup step that takes more than 2 s (loading the
data, training a feature network, starting Ray) gets a line then and one when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, TextIO, runtime_checkable


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
    starting: int = 0  # workers spawned that are still preparing (latency tables)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


class Progress(Protocol):
    def update(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


def summary_line(s: Snapshot) -> str:
    """``[study] 3/12 finished (...) | running 2, queued 1 on 2 workers | front ...``."""
    eta = "--" if s.eta_s is None else _duration(s.eta_s)
    starting = f" ({s.starting} starting: profile, latency table)" if s.starting else ""
    return (f"[{s.study}] {s.finished}/{s.target} finished (complete {s.complete}, pruned "
            f"{s.pruned}, failed {s.failed}) | running {len(s.running)}, queued {s.queued} on "
            f"{s.workers} workers{starting} | front {s.front_size}, HV {s.hypervolume:.4g} | "
            f"elapsed {_duration(s.elapsed_s)}, ETA {eta}")


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
               snapshot.queued, snapshot.workers, snapshot.starting)
        if key != self._last:
            self._last = key
            print(summary_line(snapshot), file=self.stream, flush=True)

    def step(self, what: str, lazy: bool = False) -> Step:
        """A setup step shown as plain lines (:class:`Step`)."""
        return Step(self.stream, what, lazy, live=False)

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

    def step(self, what: str, lazy: bool = False) -> Step:
        """A setup step with its counter redrawn in place (:class:`Step`)."""
        return Step(self.stream, what, lazy, live=True)

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


CLEAR_LINE = "\r\x1b[K"  # back to the line's start, erase it (a terminal's step counter)


class Step:
    """One setup step on ``stream``: a line once it has taken ``after_s`` seconds, its
    progress, and a line as it ends (only if it said anything: a quick step, or one that
    fails at once with a one-line error, stays silent).

    ``lazy``: say nothing until :meth:`advance` is called (a step that may turn out to be a
    cache hit, such as the feature network). Off a terminal, progress is a line every
    quarter of the way; on one, a line redrawn in place.
    """

    def __init__(self, stream: TextIO | None, what: str, lazy: bool = False,
                 live: bool = False, after_s: float = 2.0) -> None:
        self.stream, self.what, self.lazy, self.live = stream, what, lazy, live
        self.after_s = after_s
        self._shown = False
        self._quarter = -1
        self._started = time.monotonic()
        self._lock = threading.Lock()  # the timer thread and the step's own thread print
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        if not self.lazy and self.stream is not None:
            self._timer = threading.Timer(self.after_s, self._show, (f"{self.what} ...",))
            self._timer.daemon = True
            self._timer.start()
        return self

    def advance(self, done: int, total: int) -> None:
        """``done`` of ``total`` units finished (a training step, a batch)."""
        quarter = 4 * done // max(1, total)
        if self.live:
            self._show(f"{CLEAR_LINE}{self.what}: {done}/{total}", end="")
        elif quarter != self._quarter:
            self._show(f"{self.what}: {done}/{total}")
        self._quarter = quarter

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._shown and kind is None:
            self._show(f"{CLEAR_LINE if self.live else ''}{self.what}: done in "
                       f"{time.monotonic() - self._started:.1f} s")

    def _show(self, text: str, end: str = "\n") -> None:
        if self.stream is None:
            return
        with self._lock:
            self._shown = True
            print(text, file=self.stream, end=end, flush=True)


@runtime_checkable
class ShowsSteps(Protocol):
    def step(self, what: str, lazy: bool = False) -> Step: ...


def setup_step(progress: object, what: str, lazy: bool = False) -> Step:
    """A :class:`Step` shown by ``progress``, or a silent one when it shows no steps (a
    progress written before steps existed, or none)."""
    if isinstance(progress, ShowsSteps):
        return progress.step(what, lazy)
    return Step(None, what, lazy)


def for_stream(stream: TextIO | None = None) -> Progress:
    """The live display on a terminal, plain log lines otherwise."""
    stream = stream or sys.stderr
    return LiveDisplay(stream) if stream.isatty() else LogLines(stream)
