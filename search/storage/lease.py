"""The coordinator lease: one coordinator per study, recorded in the study itself.

The lease is a study user attribute (:data:`LEASE`): the holder's host, pid, start time,
last heartbeat and a random token. A coordinator takes it before it writes anything
(before stale trials are recovered), renews it from its loop and releases it on exit. A
second coordinator finds it alive and stops with one line naming the holder; a lease whose
heartbeat is older than its timeout, or whose holder's pid is gone on this very host, is
taken over (that start is a resume).

Why the settle interval: Optuna's study user attributes are last-writer-wins, with no
compare-and-swap, and this must hold on SQLite and PostgreSQL alike. So :func:`acquire`
reads the lease, writes its own token straight away, waits :data:`SETTLE_S` and reads it
back: only the token that survived holds. Two coordinators that both read "free" both
write within milliseconds of their read; whichever write lands last is the one both read
back, so exactly one holds as long as neither write lands more than ``SETTLE_S`` after the
other's read-back. A write delayed longer than that (a stalled process, a long storage
lock) would let both hold for a moment; then the first holder's next heartbeat finds
another token and stops its loop (:class:`LeaseLostError`) before it tells another trial.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from search.storage.study import StudyError

LEASE = "coordinator"
TIMEOUT_S = 180.0  # a heartbeat older than this is a dead coordinator (on another host)
HEARTBEAT_S = 10.0  # the loop renews at most this often
SETTLE_S = 1.0  # longer than one storage write takes: see the module docstring


class LeaseHeldError(StudyError):
    """Another coordinator holds the study's lease."""


class LeaseLostError(StudyError):
    """This coordinator's lease was taken over by another one."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a study's lease; times are ``time.time()`` seconds."""

    token: str
    host: str
    pid: int
    started: float
    heartbeat: float
    timeout_s: float = TIMEOUT_S
    released: float | None = None  # set on a clean exit

    def alive(self, now: float) -> bool:
        """Running: not released, heartbeat within its timeout, and (on this host) its pid
        still a live process."""
        if self.released is not None or now - self.heartbeat > self.timeout_s:
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def text(self, now: float) -> str:
        """``host H pid P (heartbeat 3 s ago)``."""
        return f"host {self.host} pid {self.pid} (heartbeat {_ago(now - self.heartbeat)} ago)"


class Lease:
    """A held lease: :meth:`renew` from the loop, :meth:`release` on exit."""

    def __init__(self, study: optuna.Study, holder: Holder, took_over: Holder | None,
                 interval_s: float = HEARTBEAT_S) -> None:
        self.study, self.holder, self.took_over = study, holder, took_over
        self.interval_s = interval_s

    def renew(self, force: bool = False) -> None:
        """Write a fresh heartbeat (at most every ``interval_s`` unless ``force``).

        Raises:
            LeaseLostError: another coordinator's token is in the study now.
        """
        now = time.time()
        if not force and now - self.holder.heartbeat < self.interval_s:
            return
        self._check_still_mine(now)
        self.holder = replace(self.holder, heartbeat=now)
        self.study.set_user_attr(LEASE, asdict(self.holder))

    def release(self) -> None:
        """Mark the lease released, unless another coordinator holds it by now."""
        current = read(self.study)
        if current is not None and current.token == self.holder.token:
            self.study.set_user_attr(LEASE, asdict(replace(self.holder, released=time.time())))

    def _check_still_mine(self, now: float) -> None:
        current = read(self.study)
        if current is None or current.token != self.holder.token:
            who = current.text(now) if current is not None else "nobody"
            raise LeaseLostError(f"study {self.study.study_name!r}: another coordinator took "
                                 f"the lease ({who}); this one stops")


def read(study: optuna.Study) -> Holder | None:
    """The lease stored in ``study`` (re-read from the storage), or ``None``."""
    doc: dict[str, Any] | None = study.user_attrs.get(LEASE)
    return Holder(**doc) if doc else None


def acquire(study: optuna.Study, timeout_s: float = TIMEOUT_S, settle_s: float = SETTLE_S
            ) -> Lease:
    """Take ``study``'s lease for this process (see the module docstring for the race).

    Args:
        study: the study, opened but not yet written to by this run.
        timeout_s: how old this coordinator's heartbeat may get before another takes over.
        settle_s: how long to wait between writing the token and reading it back.

    Returns:
        The held lease; ``took_over`` is the dead holder it replaced, if any.

    Raises:
        LeaseHeldError: another coordinator holds it (the message names host and pid).
    """
    now = time.time()
    current = read(study)
    if current is not None and current.alive(now):
        raise _held(study, current, now)
    mine = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, timeout_s)
    study.set_user_attr(LEASE, asdict(mine))
    time.sleep(settle_s)
    survivor = read(study)
    if survivor is None or survivor.token != mine.token:
        raise _held(study, survivor or mine, time.time())
    return Lease(study, mine, current if current is not None and
                 current.released is None else None)


def _held(study: optuna.Study, holder: Holder, now: float) -> LeaseHeldError:
    return LeaseHeldError(f"study {study.study_name!r} is being searched by another "
                          f"coordinator on {holder.text(now)}; wait for it, or stop it first")


def describe(study: optuna.Study) -> str:
    """One line on the study's coordinator, for ``diffnas status``.

    ``coordinator alive on host H pid P (heartbeat 3 s ago)``, ``coordinator last seen
    2 h ago on host H pid P (not running)``, or ``no coordinator has run``.
    """
    holder, now = read(study), time.time()
    if holder is None:
        return "no coordinator has run"
    if holder.alive(now):
        return f"coordinator alive on {holder.text(now)}"
    seen = holder.released or holder.heartbeat
    how = "exited cleanly" if holder.released is not None else "not running"
    return (f"coordinator last seen {_ago(now - seen)} ago on host {holder.host} pid "
            f"{holder.pid} ({how})")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process here (a zombie, killed but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(pid, 0) is the answer
        return True
