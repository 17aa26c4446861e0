"""A warm process per worker that forks one trial process per trial.

A fresh interpreter spends seconds importing MLX and the engine and receiving the
study's data before a trial can start. The warm process (:func:`main`) does that once per worker: it imports
:mod:`workers.trial`, keeps the data it is sent, and forks a child for each trial, which inherits both. Each trial is still a process
of its own, so a crash, an abort or an out-of-memory kill ends only that trial.

Why forking is safe here: MLX starts its CPU stream thread on the first computation and
the engine sets ``OPENBLAS_NUM_THREADS=1`` before any BLAS loads, so the warm process,
which only imports and unpickles, has one thread when it forks (the tests check it).
On macOS, where MLX loads Metal at import and Apple's frameworks are not fork-safe,
trials are spawned fresh instead (:func:`default_launcher`); so they are where an MLX CUDA
backend is installed: once CUDA is initialised in a process (``import engine`` asks MLX for
its default device there), a forked child dies with SIGSEGV at its first kernel (H200,
2026-12-03: every trial of the demo search).

The warm process talks to the worker over one socket: ``("data", DataPayload)`` ->
``("ok",)``; ``("fork", launched_at)`` plus two passed descriptors (the trial's pipe and
its stderr file) -> ``("pid", pid)``, then ``("exit", code)`` when the child ends (a
negative code is the signal that killed it, as in ``subprocess``).
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import IO, Any

import numpy as np

from workers.process import Launcher, Spawn, child_env
from workers.records import DataPayload

START_ENV = "DIFFNAS_TRIAL_START"
"""``fork`` (a warm process per worker, the default on Linux) or ``spawn`` (a fresh
interpreter per trial, the default elsewhere)."""
READY_TIMEOUT_S = 300.0
# Not ``-m workers.forkserver``: the package imports this module first (for the worker).
_ENTRY = "import sys; from workers.forkserver import main; sys.exit(main(sys.argv[1:]))"


def default_launcher() -> Launcher:
    """The launcher :data:`START_ENV` asks for, else the platform's default: ``fork`` on
    Linux without an MLX CUDA backend, ``spawn`` elsewhere.

    Raises:
        ValueError: :data:`START_ENV` is neither ``fork`` nor ``spawn``.
    """
    from engine.device.kernel_cache import cuda_backend

    forkable = sys.platform.startswith("linux") and cuda_backend() is None
    mode = os.environ.get(START_ENV) or ("fork" if forkable else "spawn")
    if mode not in ("fork", "spawn"):
        raise ValueError(f"{START_ENV}={mode!r}: expected 'fork' or 'spawn'")
    return ForkServer() if mode == "fork" else Spawn()


def payload_digest(data: DataPayload) -> str:
    """A digest of ``data``'s content: the warm process is sent data only when it changes."""
    h = hashlib.blake2b(data.name.encode(), digest_size=16)
    labels = [a for a in (data.train_labels, data.val_labels) if a is not None]
    for array in (data.train, data.val, data.real, *labels):
        h.update(repr((array.shape, array.dtype.str)).encode())
        h.update(np.ascontiguousarray(array).data)
    h.update(data.feature_net)
    return h.hexdigest()


class ForkServer:
    """The worker's side of the warm process; started on the first trial, again if it died."""

    mode = "fork"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: Connection | None = None
        self._digest = ""
        self.started_s = 0.0  # the last start: interpreter, imports

    def prepare(self, data: DataPayload) -> tuple[float, float, bool]:
        """Start the warm process if it is not running and send it ``data`` if it is new."""
        start_s = transfer_s = 0.0
        if self._proc is None or self._proc.poll() is not None:
            start_s = self._start()
        digest = payload_digest(data)
        if digest != self._digest:
            start = time.perf_counter()
            ctl = self._control()
            ctl.send(("data", data))
            self._expect(ctl, "ok")
            self._digest, transfer_s = digest, time.perf_counter() - start
        return start_s, transfer_s, True

    def launch(self, child: Connection, stderr: IO[bytes], launched_at: float) -> Forked:
        """Fork a trial process that talks over ``child`` and writes to ``stderr``."""
        assert self._proc is not None, "prepare() starts the warm process"
        ctl = self._control()
        ctl.send(("fork", launched_at))
        send_handle(ctl, child.fileno(), self._proc.pid)
        send_handle(ctl, stderr.fileno(), self._proc.pid)
        pid = self._expect(ctl, "pid")
        return Forked(int(pid), self)

    def close(self) -> None:
        """Stop the warm process (its trial, if any, dies with it)."""
        if self._ctl is not None:
            self._ctl.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._proc = self._ctl = None

    def _start(self) -> float:
        self.close()
        start = time.perf_counter()
        ours, theirs = multiprocessing.Pipe(duplex=True)
        env, root = child_env()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env=env, cwd=root)
        theirs.close()
        self._ctl, self._digest = ours, ""
        if not ours.poll(READY_TIMEOUT_S):
            raise RuntimeError(f"the warm trial process did not start in {READY_TIMEOUT_S:g} s")
        self._expect(ours, "ready")
        self.started_s = time.perf_counter() - start
        return self.started_s

    def _control(self) -> Connection:
        assert self._ctl is not None, "the warm process is not running"
        return self._ctl

    def _expect(self, ctl: Connection, tag: str) -> Any:
        try:
            message = ctl.recv()
        except EOFError:
            code = self._proc.wait() if self._proc is not None else None
            self.close()
            raise RuntimeError(f"the warm trial process exited with code {code}") from None
        assert message[0] == tag, (message, tag)
        return message[1] if len(message) > 1 else None

    def exit_code(self, timeout_s: float | None) -> tuple[bool, int | None]:
        """Wait up to ``timeout_s`` for the running child's end: ``(ended, code)``; a warm
        process that died ends its child too (its code is then the warm process's)."""
        ctl = self._control()
        if not ctl.poll(timeout_s):
            return False, None
        try:
            return True, int(self._expect(ctl, "exit"))
        except RuntimeError:
            return True, -signal.SIGKILL


class Forked:
    """A trial process forked by the warm process: as much of ``Popen`` as the worker uses."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server

    def poll(self) -> int | None:
        return self._ended(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._ended(timeout)
        if code is None and self.returncode is None:
            raise subprocess.TimeoutExpired(f"trial process {self.pid}", timeout or 0.0)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _ended(self, timeout_s: float | None) -> int | None:
        if self.returncode is None:
            ended, code = self._server.exit_code(timeout_s)
            if ended:
                self.returncode = code
        return self.returncode


# -- the warm process --------------------------------------------------------------------


def serve_forks(ctl: Connection) -> int:
    """The warm process's loop: keep the data, fork a trial process on request, report its end."""
    # Imported here, not at the top: the worker imports this module for ForkServer, and only
    # the warm process needs MLX and the engine loaded (the whole point of it).
    from workers import trial

    ctl.send(("ready",))
    data: DataPayload | None = None
    while True:
        try:
            message = ctl.recv()
        except EOFError:  # the worker is gone
            return 0
        if message[0] == "data":
            data = message[1]
            ctl.send(("ok",))
            continue
        fd, err_fd = recv_handle(ctl), recv_handle(ctl)
        pid = os.fork()
        if pid == 0:
            _child(ctl, fd, err_fd, float(message[1]), data, trial.serve)
        os.close(fd)
        os.close(err_fd)
        ctl.send(("pid", pid))
        code = _wait(ctl, pid)
        if code is None:
            return 0
        ctl.send(("exit", code))


def _child(ctl: Connection, fd: int, err_fd: int, launched_at: float,
           data: DataPayload | None, serve: Any) -> None:
    """The forked trial process: its own stderr, one trial, then exit (never returns)."""
    code = 1
    try:
        ctl.close()
        os.dup2(err_fd, 2)
        os.close(err_fd)
        code = serve(Connection(fd), launched_at, "fork", data)
    except BaseException:  # noqa: BLE001 (the child must never return into the loop)
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _wait(ctl: Connection, pid: int) -> int | None:
    """The child's exit code (negative: its signal); None if the worker went away first
    (the child is then killed)."""
    watch = [ctl.fileno()]
    pidfd = _pidfd(pid)
    if pidfd is not None:
        watch.append(pidfd)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            readable, _, _ = select.select(watch, [], [], 0.2)
            if ctl.fileno() in readable and _worker_gone(ctl):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _worker_gone(ctl: Connection) -> bool:
    try:
        ctl.recv()
    except EOFError:
        return True
    return False


def _die_with_worker() -> None:
    """Linux: the kernel kills the warm process when the worker dies (and its trial, whose
    own parent-death signal is set in :func:`workers.trial.serve`)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(argv: list[str]) -> int:
    """Entry point of the warm process: ``python -m workers.forkserver FD``."""
    _die_with_worker()
    return serve_forks(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
