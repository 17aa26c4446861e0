"""One timed measurement at a time per machine (DESIGN.md, measurement protocol).

Workers that share a machine -- the embedded cluster's workers, or several studies on one
Mac -- share its device, so a latency measured while another worker trains measures that
worker too: during a 2-worker demo search on the 2-core CPU, a model whose sampling loop
takes 60 ms alone measured 122 ms. Every trial process therefore takes the machine's device
lock: *shared* for computing (one training step, a validation, the evaluation), which
processes hold together, and *exclusive* for a timed measurement, which waits for the
steps in flight to end and holds the others back until it is done.

Two ``flock`` files under the temp folder (``DIFFNAS_LOCK_DIR`` overrides it): ``device``
is the lock itself, ``turnstile`` keeps a waiting measurement from starving behind a
stream of steps (every holder passes the turnstile on its way in; a measurement keeps it
until it holds the device). The kernel drops a dead process's locks. The files are opened
read-only (``flock`` needs no more), so the processes of every user of a machine share them.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR_ENV = "DIFFNAS_LOCK_DIR"


class DeviceLock:
    """The machine's device lock, as seen from this process (files opened on first use).

    ``waited_s``: how long this process has waited for the exclusive lock so far.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder or os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
        self.waited_s = 0.0
        self._files: tuple[int, int] | None = None

    def _open(self) -> tuple[int, int]:
        if self._files is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDONLY | os.O_CREAT
            self._files = (os.open(self.folder / "diffnas-device.turnstile", flags, 0o666),
                           os.open(self.folder / "diffnas-device.lock", flags, 0o666))
        return self._files

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Compute on the device; other processes may compute too, but none measures."""
        turnstile, device = self._open()
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(device, fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(device, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Measure with the device to this process alone."""
        turnstile, device = self._open()
        start = time.perf_counter()
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(device, fcntl.LOCK_EX)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        self.waited_s += time.perf_counter() - start
        try:
            yield
        finally:
            fcntl.flock(device, fcntl.LOCK_UN)
