"""One timed measurement at a time per machine (DESIGN.md, measurement protocol).

Workers that share a machine -- the embedded cluster's workers, or several studies on one
Mac -- share its device, so a latency measured while another worker trains measures that
worker too: during a 2-worker demo search on the 2-core CPU, a model whose sampling loop
takes 60 ms alone measured 122 ms. Every trial process therefore takes the machine's device
lock: *shared* for computing (one training step, a validation, the evaluation), which
processes hold together, and *exclusive* for a timed measurement, which waits for the
steps in flight to end and holds the others back until it is done.

Two ``flock`` files (``device`` is the lock itself; ``turnstile`` keeps a waiting
measurement from starving behind a stream of steps: every holder passes the turnstile on its
way in, and a measurement keeps it until it holds the device). The kernel drops a dead
process's locks.

The files live in a folder of this user's own (``diffnas-<uid>`` under the temp folder, mode
0700; ``DIFFNAS_LOCK_DIR`` overrides it) and are opened without following symlinks, so no
other local user can hold them or point them elsewhere: a lock every user shared could be
held forever by any of them. A process that waits longer than ``DIFFNAS_LOCK_TIMEOUT_S``
(default 900 s) gives up with :class:`DeviceLockTimeout`, which fails its trial with that
reason.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR_ENV = "DIFFNAS_LOCK_DIR"
TIMEOUT_ENV = "DIFFNAS_LOCK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0
POLL_S = 0.002


class DeviceLockTimeout(RuntimeError):
    """Another process held the device lock for longer than the timeout."""


def default_folder() -> Path:
    """This user's lock folder: ``DIFFNAS_LOCK_DIR``, else ``<tmp>/diffnas-<uid>``."""
    return Path(os.environ.get(LOCK_DIR_ENV) or
                Path(tempfile.gettempdir()) / f"diffnas-{os.getuid()}")


def _own_folder(folder: Path) -> Path:
    """Create ``folder`` (0700) or check that it is a real folder of this user's.

    Raises:
        PermissionError: it is a symlink, or belongs to another user.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"device lock folder {folder} is a symlink or another user's; "
                              f"set {LOCK_DIR_ENV} to a folder of your own")
    return folder


class DeviceLock:
    """The machine's device lock, as seen from this process (files opened on first use).

    ``waited_s``: how long this process has waited for the exclusive lock so far.
    """

    def __init__(self, folder: str | Path | None = None, timeout_s: float | None = None
                 ) -> None:
        self.folder = Path(folder) if folder else default_folder()
        self.timeout_s = float(timeout_s if timeout_s is not None else
                               os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self.waited_s = 0.0
        self._files: tuple[int, int] | None = None

    def _open(self) -> tuple[int, int]:
        if self._files is None:
            folder = _own_folder(self.folder)
            flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
            self._files = (os.open(folder / "diffnas-device.turnstile", flags, 0o600),
                           os.open(folder / "diffnas-device.lock", flags, 0o600))
        return self._files

    def _take(self, fd: int, mode: int, deadline: float) -> None:
        """``flock(fd, mode)``, giving up at ``deadline`` (time.monotonic)."""
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DeviceLockTimeout(
                        f"waited {self.timeout_s:g} s for the device lock in {self.folder}; "
                        f"another process holds it (raise {TIMEOUT_ENV} to wait longer)"
                    ) from None
                time.sleep(POLL_S)

    def _enter(self, mode: int) -> int:
        """Pass the turnstile and take the device in ``mode``; returns the device fd."""
        turnstile, device = self._open()
        deadline = time.monotonic() + self.timeout_s
        self._take(turnstile, fcntl.LOCK_EX, deadline)
        try:
            self._take(device, mode, deadline)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        return device

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Compute on the device; other processes may compute too, but none measures."""
        device = self._enter(fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(device, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Measure with the device to this process alone."""
        start = time.perf_counter()
        device = self._enter(fcntl.LOCK_EX)
        self.waited_s += time.perf_counter() - start
        try:
            yield
        finally:
            fcntl.flock(device, fcntl.LOCK_UN)
