"""The trial process's stopwatch: wall time per phase (:class:`workers.records.WallTime`).

Waits are phases of their own: a wait for the device lock inside a timed phase moves from
that phase to ``idle_s``, so a measurement that queued behind another worker's does not
look slow. Validation that runs inside a training step (at ``eval_every`` and the last
step) is split off as that step's time beyond the median step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from workers.device_lock import DeviceLock
from workers.records import WallTime


class PhaseClock:
    """Seconds per :data:`workers.records.WALL_PHASES` name (without ``_s``) so far."""

    def __init__(self, device: DeviceLock) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.answers_s = 0.0  # of ``idle``: the coordinator's answers
        self._steps: list[float] = []

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + max(0.0, seconds)

    def answered(self, seconds: float) -> None:
        """A round trip to the coordinator: idle, kept apart from the device lock's waits."""
        self.add("idle", seconds)
        self.answers_s += max(0.0, seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name``, less the exclusive-lock waits inside it (idle)."""
        waited, start = self.device.waited_s, time.perf_counter()
        try:
            yield
        finally:
            wait = self.device.waited_s - waited
            self.add(name, time.perf_counter() - start - wait)
            self.add("idle", wait)

    @contextmanager
    def shared(self, name: str) -> Iterator[None]:
        """The shared device lock around a ``name`` block; the wait to get it is idle."""
        start = time.perf_counter()
        with self.device.shared():
            entered = time.perf_counter()
            self.add("idle", entered - start)
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - entered)

    def step_guard(self, history: Callable[[], int]) -> Callable[[], AbstractContextManager[Any]]:
        """A ``guard`` for :func:`engine.training.train.train`: each step under the shared
        lock, timed as ``train``; a step that added a validation point (``history()`` grew)
        has its time beyond the median step moved to ``validate``."""

        @contextmanager
        def guard() -> Iterator[None]:
            before, start = history(), time.perf_counter()
            with self.device.shared():
                entered = time.perf_counter()
                self.add("idle", entered - start)
                yield
            took = time.perf_counter() - entered
            if history() > before and self._steps:
                extra = max(0.0, took - statistics.median(self._steps))
                self.add("validate", extra)
                took -= extra
            else:
                self._steps.append(took)
            self.add("train", took)

        return guard

    def walltime(self, **fields: Any) -> WallTime:
        """The phases so far as a :class:`WallTime` (``wall_s`` their sum)."""
        phases: dict[str, Any] = {f"{k}_s": v for k, v in self.seconds.items()}
        return WallTime(**phases, wall_s=sum(phases.values()), answers_s=self.answers_s,
                        **fields)
