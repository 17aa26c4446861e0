"""The worker's side of a trial's child process: start it, relay its reports, read its end.

A segfault, an abort or an out-of-memory kill ends only the child; :func:`run_in_child`
turns that into a CRASHED outcome whose reason names the signal or exit code and the
last lines the child wrote to stderr.

A :class:`Launcher` starts the child: :class:`Spawn` runs a fresh ``python -m
workers.trial``; :class:`workers.forkserver.ForkServer` forks a warm process that has
imported MLX and holds the study's data. Either way one trial is one process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Protocol

from workers.records import DataPayload, Decision, EventKind, Outcome, TrialOutcome, TrialRequest

Relay = Callable[[EventKind, Any, bool], Decision]
"""Forwards one child report to the coordinator; blocks for a Decision when asked to."""

POLL_S = 0.2
STDERR_LINES = 5


class TrialProcess(Protocol):
    """A running trial process, as much of ``subprocess.Popen`` as the worker uses."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts one trial process; ``mode`` names how (:class:`workers.records.WallTime`)."""

    mode: str

    def prepare(self, data: DataPayload) -> tuple[float, float, bool]:
        """Get ready to launch a trial on ``data``.

        Returns:
            Seconds spent starting a warm process, seconds spent sending it ``data``, and
            whether the launched process will already hold ``data`` (then it is not sent).
        """

    def launch(self, child: Connection, stderr: IO[bytes], launched_at: float
               ) -> TrialProcess: ...


class Spawn:
    """A fresh ``python -m workers.trial`` interpreter per trial."""

    mode = "spawn"

    def prepare(self, data: DataPayload) -> tuple[float, float, bool]:
        return 0.0, 0.0, False

    def launch(self, child: Connection, stderr: IO[bytes], launched_at: float
               ) -> TrialProcess:
        env, root = child_env()
        return subprocess.Popen(
            [sys.executable, "-m", "workers.trial", str(child.fileno()), repr(launched_at)],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, env=env, cwd=root)


def run_in_child(request: TrialRequest, data: DataPayload, relay: Relay,
                 on_start: Callable[[int], None] | None = None,
                 launcher: Launcher | None = None) -> TrialOutcome:
    """Run ``request`` in a trial process of its own and return its outcome.

    Args:
        request: the attempt.
        data: the study's data.
        relay: forwards the child's reports to the coordinator.
        on_start: receives the child's pid once it runs.
        launcher: how to start the child (default: :class:`Spawn`).
    """
    launcher = launcher or Spawn()
    start_s, transfer_s, held = launcher.prepare(data)
    parent, child = multiprocessing.Pipe(duplex=True)
    with tempfile.TemporaryFile() as stderr:
        proc = launcher.launch(child, stderr, time.time())
        child.close()
        if on_start is not None:
            on_start(proc.pid)
        try:
            done = _pump(parent, proc, request, None if held else data, relay)
        finally:
            parent.close()
            _reap(proc)
        if done is None:
            return _crashed(request, proc.returncode, _tail(stderr))
    outcome, sent_at = done
    if outcome.walltime is None:
        return outcome
    back_s = max(0.0, time.time() - sent_at)
    return replace(outcome, walltime=outcome.walltime.plus(
        start_s=start_s, transfer_s=transfer_s, write_s=back_s))


def child_env() -> tuple[dict[str, str], str]:
    """The environment and working folder of a child process: this package importable."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    # numpy loads before the engine in a child (``-m workers.…`` imports this package
    # first); one BLAS thread, as the engine sets, leaves a warm process one thread to fork.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env, root


def _pump(conn: Connection, proc: TrialProcess, request: TrialRequest,
          data: DataPayload | None, relay: Relay) -> tuple[TrialOutcome, float] | None:
    """Relay messages until the child sends its outcome and when it sent it (or dies:
    then ``None``)."""
    try:
        conn.send(("run", request, data))
        while True:
            if not conn.poll(POLL_S):
                if proc.poll() is not None and not conn.poll(0):
                    return None
                continue
            message = conn.recv()
            if message[0] == "done":
                outcome = message[1]
                assert isinstance(outcome, TrialOutcome)
                return outcome, float(message[2])
            _, kind, payload = message
            needs = kind in (EventKind.MEASURED, EventKind.RUNG)
            decision = relay(kind, payload, needs)
            if needs:
                conn.send(("decision", decision))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return None


def _reap(proc: TrialProcess) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _crashed(request: TrialRequest, code: int | None, stderr: str) -> TrialOutcome:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = f"trial process killed by {name}"
        if name == "SIGKILL":
            why += " (out of memory, or killed)"
    else:
        why = f"trial process exited with code {code}"
    if stderr:
        why += f": {stderr}"
    return TrialOutcome(request.number, request.attempt, Outcome.CRASHED, reason=why,
                        exit_code=code)


def _tail(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    lines = stderr.read().decode(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in lines[-STDERR_LINES:] if line.strip())
