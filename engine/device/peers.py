"""Peer processes: the engine's way to use more than one CPU core.

MLX's CPU backend runs element-wise ops, reductions and copies on one thread; only BLAS
uses more, and CPU streams overlapped in sampling but not in training
(``benchmarks/cpu_speed.md``). Separate processes do overlap. A process with a budget of
``n`` cores (:func:`thread_budget`) splits a batch's rows into :func:`shares`, keeps the
first and hands the others to ``n - 1`` :class:`Peer` processes, each on one BLAS thread.
Arrays travel through shared memory, laid out by :class:`Layout`; small messages
through a pipe. Data-parallel training (:mod:`engine.training.parallel`) and sampling
(:mod:`engine.sampling.parallel`) are built on this.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from multiprocessing.connection import Connection
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

_HELD = [0]  # open one_process() blocks


@contextmanager
def one_process() -> Iterator[None]:
    """Inside, work that would be split over peers stays in this process (:func:`alone`
    is true): what measures this process's peak memory must see the whole job."""
    _HELD[0] += 1
    try:
        yield
    finally:
        _HELD[0] -= 1


def alone() -> bool:
    """True inside :func:`one_process`: no split, whatever the budget or the settings say."""
    return _HELD[0] > 0


def thread_budget() -> int:
    """The cores this process was given: ``OPENBLAS_NUM_THREADS`` (the engine's default 1)."""
    value = os.environ.get("OPENBLAS_NUM_THREADS") or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"OPENBLAS_NUM_THREADS={value!r}: not a whole number") from None


def process_count(env: str) -> int:
    """Processes to split work over: the whole number in ``env`` if set, else
    :func:`thread_budget`; 1 inside :func:`one_process`. A bad value names ``env``."""
    if alone():
        return 1
    value = os.environ.get(env) or str(thread_budget())
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{env}={value!r}: not a whole number") from None
    if n < 1:
        raise ValueError(f"{env}={value!r}: at least 1")
    return n


def shares(batch: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous row ranges ``(lo, hi)`` covering a batch of ``batch``, as even as can be."""
    return list(pairwise([batch * i // n for i in range(n + 1)]))


class Layout:
    """Where each array of a list lies in one flat float32 buffer (shared memory)."""

    def __init__(self, arrays: list[mx.array]):
        self.shapes = [tuple(a.shape) for a in arrays]
        self.offsets = np.cumsum([0, *(math.prod(s) for s in self.shapes)]).tolist()
        self.size = int(self.offsets[-1])

    def write(self, flat: np.ndarray, arrays: list[mx.array]) -> None:
        for a, lo, hi in zip(arrays, self.offsets[:-1], self.offsets[1:]):
            flat[lo:hi] = np.asarray(a).reshape(-1)  # float32 weights and gradients

    def read(self, flat: np.ndarray) -> list[mx.array]:
        return [mx.array(flat[lo:hi].reshape(shape))
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]


def tree_like(tree: Any, leaves: list[mx.array]) -> Any:
    """``leaves``, in ``tree_flatten`` order, arranged as ``tree`` (empty branches kept)."""
    it = iter(leaves)
    return tree_map(lambda _: next(it), tree)


class Peer:
    """A spawned process running ``target(conn, *args)`` with one BLAS thread.

    ``target`` usually calls :func:`serve`. :meth:`request` sends a message and waits for
    the answer; a peer that died or failed raises ``RuntimeError`` naming it.
    """

    def __init__(self, target: Callable[..., None], args: tuple, name: str):
        ctx = mp.get_context("spawn")  # fork would copy MLX's threads' locks mid-use
        self._conn, there = ctx.Pipe()
        with _one_blas_thread():
            self.process = ctx.Process(target=target, args=(there, *args), name=name, daemon=True)
            self.process.start()
        there.close()

    def send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:  # a broken pipe: the peer is gone
            raise self._died() from None

    def receive(self) -> Any:
        """The answer to the last message sent."""
        try:
            while not self._conn.poll(1.0):
                if not self.process.is_alive():
                    raise EOFError
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if kind != "ok":
            raise RuntimeError(f"peer process {self.process.name}: {value}")
        return value

    def request(self, message: tuple) -> Any:
        self.send(message)
        return self.receive()

    def stop(self) -> None:
        """Ask the peer to end; kill it if it has not within 5 s."""
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def _died(self) -> RuntimeError:
        self.process.join(timeout=1)
        return RuntimeError(f"peer process {self.process.name} (pid {self.process.pid}) died, "
                            f"exit code {self.process.exitcode}")


def serve(conn: Connection, handle: Callable[[tuple], Any]) -> None:
    """The peer's side: answer each message with ``("ok", handle(message))``, or with
    ``("error", why)`` when it raises, until ``("stop",)`` or the pipe closes."""
    mx.set_default_device(mx.cpu)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        try:
            answer = ("ok", handle(message))
        except Exception as e:  # noqa: BLE001 - reported to the process that asked
            answer = ("error", f"{type(e).__name__}: {e}")
        conn.send(answer)


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """A peer spawned inside inherits ``OPENBLAS_NUM_THREADS=1``: one core each."""
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = before
