"""The worker's side of a trial's child process: start it, relay its reports, read its end.

A segfault, an abort or an out-of-memory kill ends only the child; :func:`run_in_child`
turns that into a CRASHED outcome whose reason names the signal or exit code and the
last lines the child wrote to stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

from workers.records import DataPayload, Decision, EventKind, Outcome, TrialOutcome, TrialRequest

Relay = Callable[[EventKind, Any, bool], Decision]
"""Forwards one child report to the coordinator; blocks for a Decision when asked to."""

POLL_S = 0.2
STDERR_LINES = 5


def run_in_child(request: TrialRequest, data: DataPayload, relay: Relay,
                 on_start: Callable[[int], None] | None = None) -> TrialOutcome:
    """Run ``request`` in a fresh ``python -m workers.trial`` process and return its outcome."""
    parent, child = multiprocessing.Pipe(duplex=True)
    with tempfile.TemporaryFile() as stderr:
        proc = _spawn(child, stderr)
        child.close()
        if on_start is not None:
            on_start(proc.pid)
        try:
            outcome = _pump(parent, proc, request, data, relay)
        finally:
            parent.close()
            _reap(proc)
        if outcome is not None:
            return outcome
        return _crashed(request, proc.returncode, _tail(stderr))


def child_env() -> tuple[dict[str, str], str]:
    """The environment and working folder of a child process: this package importable."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env, root


def _spawn(child: Connection, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    env, root = child_env()
    return subprocess.Popen([sys.executable, "-m", "workers.trial", str(child.fileno())],
                            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=root)


def _pump(conn: Connection, proc: subprocess.Popen[bytes], request: TrialRequest,
          data: DataPayload, relay: Relay) -> TrialOutcome | None:
    """Relay messages until the child sends its outcome (or dies: then ``None``)."""
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
                return outcome
            _, kind, payload = message
            needs = kind in (EventKind.MEASURED, EventKind.RUNG)
            decision = relay(kind, payload, needs)
            if needs:
                conn.send(("decision", decision))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return None


def _reap(proc: subprocess.Popen[bytes]) -> None:
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
