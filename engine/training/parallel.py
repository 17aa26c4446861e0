"""Data-parallel training on the CPU: one batch's gradient computed by several processes.

MLX's CPU backend runs element-wise ops, reductions and copies on one thread; only BLAS
uses more, and a batch split over CPU streams did not overlap in training
(``benchmarks/cpu_speed.md``, session 7). Processes do overlap. With a budget of ``n``
cores (:func:`processes_for`), each training step runs as:

1. this process writes the weights to shared memory and sends the batch and its key to
   ``n - 1`` peer processes (spawned once per update, each with one BLAS thread);
2. every process takes the gradient of its share of the batch's rows, this one included;
3. this process sums the shares, clips and steps the optimizer, as
   :func:`engine.training.train.compiled_update` does.

The maths is that of one process: each share draws the whole batch's ``t`` and noise from
the step's key and keeps its own rows (``rows`` of
:func:`engine.sampling.diffusion.diffusion_loss`), and its loss is its part of the
batch's mean, so the summed gradient is the one-process gradient up to the order of float
sums. Dropout masks are drawn per share (from seeds the step's generator gives).

Only the plain diffusion loss runs this way (what :func:`engine.training.train.train`
and the speed harness train); distillation, whose losses close over teacher networks,
keeps the one-process update. The peers' memory is their own: a process's peak memory
counts its share, not the step's.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from itertools import pairwise
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.config import Config
from engine.device import compile_mode
from engine.device.blas import blas_threads
from engine.model.unet import UNet
from engine.training.objective import base_loss, loss_and_grad

ENV = "DIFFNAS_TRAIN_PROCESSES"
"""Processes a CPU training step is split over; default: the thread budget (below)."""


def thread_budget() -> int:
    """The cores this process was given: ``OPENBLAS_NUM_THREADS`` (the engine's default 1)."""
    value = os.environ.get("OPENBLAS_NUM_THREADS") or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"OPENBLAS_NUM_THREADS={value!r}: not a whole number") from None


def processes_for(config: Config) -> int:
    """How many processes train ``config``'s steps: ``DIFFNAS_TRAIN_PROCESSES`` if set, else
    :func:`thread_budget`; 1 off the CPU, and never more than the batch has rows."""
    if mx.default_device() != mx.cpu:
        return 1
    value = os.environ.get(ENV) or str(thread_budget())
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: not a whole number") from None
    if n < 1:
        raise ValueError(f"{ENV}={value!r}: at least 1")
    return min(n, config.train.batch_size)


def shares(batch: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous row ranges ``(lo, hi)`` covering a batch of ``batch``."""
    cuts = [batch * i // n for i in range(n + 1)]
    return list(pairwise(cuts))


class _Layout:
    """Where each array of a parameter tree lies in one flat float32 buffer."""

    def __init__(self, named: list[tuple[str, mx.array]]):
        self.names = [k for k, _ in named]
        self.shapes = [tuple(v.shape) for _, v in named]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.size = self.offsets[-1]

    def write(self, flat: np.ndarray, arrays: list[mx.array]) -> None:
        for a, lo, hi in zip(arrays, self.offsets[:-1], self.offsets[1:]):
            flat[lo:hi] = np.asarray(a.astype(mx.float32)).reshape(-1)

    def read(self, flat: np.ndarray) -> list[mx.array]:
        return [mx.array(flat[lo:hi].reshape(shape))
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]


def _share_grad(model: nn.Module, config: Config, rows: tuple[int, int]) -> Callable:
    """``(x0, key, *labels) -> (loss share, grads)`` of ``rows``, compiled as a whole graph."""
    value_and_grad = loss_and_grad(model, base_loss(config, rows), config.train.dtype)
    state = [model.state, mx.random.state]  # outputs too: the gradient traces set the weights
    return compile_mode.whole(value_and_grad, inputs=state, outputs=state)


class DataParallelUpdate:
    """``update(x0, key[, labels]) -> loss`` over ``n`` processes; :meth:`close` ends the peers.

    Drop-in for :func:`engine.training.train.compiled_update` with the plain diffusion
    loss of ``config``. The peers start with the first update's weights and follow every
    later one; a peer that dies raises ``RuntimeError`` at the next step.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, config: Config, n: int):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.rows = shares(config.train.batch_size, n)
        self.params = _Layout(tree_flatten(model.parameters()))
        self.grads = _Layout(tree_flatten(model.trainable_parameters()))
        self.own = _share_grad(model, config, self.rows[0])
        clip = config.train.grad_clip
        state = [model.state, optimizer.state]

        @partial(compile_mode.whole, inputs=state, outputs=state)
        def apply(own: dict, *others: dict) -> None:
            total = tree_map(lambda *g: sum(g[1:], g[0]), own, *others)
            if clip > 0:
                total, _ = optim.clip_grad_norm(total, clip)
            optimizer.update(model, total)

        self._apply = apply
        size = (self.params.size + self.grads.size * (n - 1)) * 4
        self._shm = SharedMemory(create=True, size=max(size, 4))
        buf = np.ndarray((size // 4,), np.float32, self._shm.buf)
        self._weights = buf[:self.params.size]
        self._peer_grads = [buf[self.params.size + i * self.grads.size:
                                self.params.size + (i + 1) * self.grads.size]
                            for i in range(n - 1)]
        self._peers: list[tuple[Any, Connection]] = []
        ctx = mp.get_context("spawn")
        with _one_blas_thread_for_children():
            for i, rows in enumerate(self.rows[1:]):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_peer_main, daemon=True, name=f"diffnas-grad-{i + 1}",
                                   args=(there, config, rows, self._shm.name,
                                         self.params.size + i * self.grads.size))
                proc.start()
                there.close()
                self._peers.append((proc, here))
        self._finalizer = weakref.finalize(self, _shut, self._peers, self._shm)

    @property
    def processes(self) -> int:
        return len(self.rows)

    def __call__(self, x0: mx.array, key: mx.array, *labels: mx.array) -> mx.array:
        if x0.shape[0] != self.config.train.batch_size:
            raise ValueError(f"batch of {x0.shape[0]} rows: this update splits "
                             f"{self.config.train.batch_size}")
        seeds = np.asarray(mx.random.randint(0, 2**31 - 1, (self.processes,)))  # dropout
        self.params.write(self._weights, [v for _, v in tree_flatten(self.model.parameters())])
        message = ("step", np.asarray(x0), np.asarray(key), [np.asarray(y) for y in labels])
        for (proc, conn), seed in zip(self._peers, seeds[1:]):
            try:
                conn.send((*message, int(seed)))
            except OSError:  # a broken pipe: the peer is gone
                raise _died(proc) from None
        mx.random.seed(int(seeds[0]))
        with blas_threads(1):
            loss, own = self.own(x0, key, *labels)
            mx.eval(loss, own)
        others, total = [], loss
        for (proc, conn), flat in zip(self._peers, self._peer_grads):
            share = _receive(proc, conn)
            total = total + share
            others.append(_like(own, self.grads.read(flat)))
        self._apply(own, *others)
        return total

    def close(self) -> None:
        """End the peer processes and free the shared memory (also at garbage collection)."""
        self._finalizer()


def _like(tree: dict, arrays: list[mx.array]) -> dict:
    """``arrays``, in ``tree_flatten`` order, arranged as ``tree`` (empty branches kept)."""
    leaves = iter(arrays)
    return tree_map(lambda _: next(leaves), tree)  # type: ignore[no-any-return]


def _receive(proc: Any, conn: Connection) -> float:
    """A peer's loss share, once its gradient is in shared memory."""
    try:
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise EOFError
        kind, value = conn.recv()
    except (EOFError, OSError):
        raise _died(proc) from None
    if kind != "ok":
        raise RuntimeError(f"data-parallel peer {proc.name}: {value}")
    return float(value)


def _died(proc: Any) -> RuntimeError:
    proc.join(timeout=1)
    return RuntimeError(f"data-parallel peer {proc.name} (pid {proc.pid}) died, exit code "
                        f"{proc.exitcode}")


def _shut(peers: list[tuple[Any, Connection]], shm: SharedMemory) -> None:
    for proc, conn in peers:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for proc, conn in peers:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
    shm.close()
    shm.unlink()


@contextmanager
def _one_blas_thread_for_children() -> Any:
    """Spawned peers inherit ``OPENBLAS_NUM_THREADS=1``: one core each."""
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = before


def _peer_main(conn: Connection, cfg: Config, rows: tuple[int, int], shm_name: str,
               grads_at: int) -> None:
    """A peer: rebuild the model, then per step read the weights, write the share's grads."""
    mx.set_default_device(mx.cpu)
    model = UNet(cfg.unet)
    model.checkpointing = cfg.train.checkpointing
    params = _Layout(tree_flatten(model.parameters()))
    grads = _Layout(tree_flatten(model.trainable_parameters()))
    grad_fn = _share_grad(model, cfg, rows)
    shm = SharedMemory(name=shm_name)
    flat = np.ndarray((grads_at + grads.size,), np.float32, shm.buf)
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            _, x0, key, labels, seed = message
            try:
                model.update(tree_unflatten(list(zip(params.names,
                                                     params.read(flat[:params.size])))))
                mx.random.seed(seed)
                loss, g = grad_fn(mx.array(x0), mx.array(key), *map(mx.array, labels))
                mx.eval(loss, g)
                grads.write(flat[grads_at:], [v for _, v in tree_flatten(g)])
                conn.send(("ok", float(loss.item())))
            except Exception as e:  # noqa: BLE001 - reported to the training process
                conn.send(("error", f"{type(e).__name__}: {e}"))
    except EOFError:
        return
    finally:
        del flat
        shm.close()
