"""Data-parallel training on the CPU: one batch's gradient computed by several processes.

A batch split over CPU streams did not overlap in training (``benchmarks/cpu_speed.md``,
session 7); processes do (:mod:`engine.device.peers`). With a budget of ``n`` cores
(:func:`processes_for`), each training step runs as:

1. this process writes the weights to shared memory and sends the batch and its key to
   ``n - 1`` peer processes (spawned once per training run, each with one BLAS thread);
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
keeps the one-process update. The peers' memory is their own, so what measures a step's
peak memory runs it inside :func:`engine.device.peers.one_process`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.config import Config
from engine.device import compile_mode
from engine.device.blas import blas_threads
from engine.device.peers import Layout, Peer, process_count, serve, shares, tree_like
from engine.model.unet import UNet
from engine.training.fused import clip_and_update
from engine.training.objective import base_loss, loss_and_grad

ENV = "DIFFNAS_TRAIN_PROCESSES"
"""Processes a CPU training step is split over; default: the thread budget."""


def processes_for(config: Config) -> int:
    """How many processes train ``config``'s steps: ``DIFFNAS_TRAIN_PROCESSES`` if set, else
    the thread budget (:func:`engine.device.peers.process_count`); 1 off the CPU, and never
    more than a batch's rows."""
    if mx.default_device() != mx.cpu:
        return 1
    return min(process_count(ENV), config.train.batch_size)


def _share_grad(model: nn.Module, config: Config, rows: tuple[int, int]) -> Callable:
    """``(x0, key, *labels) -> (loss share, grads)`` of ``rows``, compiled as a whole graph."""
    value_and_grad = loss_and_grad(model, base_loss(config, rows), config.train.dtype)
    state = [model.state, mx.random.state]  # outputs too: the gradient traces set the weights
    return compile_mode.whole(value_and_grad, inputs=state, outputs=state)


def _leaves(tree: dict) -> list[mx.array]:
    return [v for _, v in tree_flatten(tree)]


class DataParallelUpdate:
    """``update(x0, key[, labels]) -> loss`` over ``n`` processes; :meth:`close` ends the peers.

    Drop-in for :func:`engine.training.train.compiled_update` with the plain diffusion
    loss of ``config``. The peers take the weights at every step; a peer that dies
    raises ``RuntimeError`` at the next step.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, config: Config, n: int):
        self.model, self.config = model, config
        self.rows = shares(config.train.batch_size, n)
        self.params = Layout(_leaves(model.parameters()))
        self.grads = Layout(_leaves(model.trainable_parameters()))
        self.own = _share_grad(model, config, self.rows[0])
        clip = config.train.grad_clip
        state = [model.state, optimizer.state]

        @partial(compile_mode.whole, inputs=state, outputs=state)
        def apply(own: dict, *others: dict) -> None:
            total = tree_map(lambda *g: sum(g[1:], g[0]), own, *others)
            clip_and_update(optimizer, model, total, clip)

        self._apply = apply
        size = self.params.size + self.grads.size * (n - 1)
        self._shm = SharedMemory(create=True, size=max(4 * size, 4))
        buf = np.ndarray((size,), np.float32, self._shm.buf)
        self._weights = buf[:self.params.size]
        starts = [self.params.size + i * self.grads.size for i in range(n - 1)]
        self._peer_grads = [buf[a:a + self.grads.size] for a in starts]
        self._peers = [Peer(_peer_main, (config, rows, self._shm.name, at), f"diffnas-grad-{i + 1}")
                       for i, (rows, at) in enumerate(zip(self.rows[1:], starts))]
        self._finalizer = weakref.finalize(self, _shut, self._peers, self._shm)

    @property
    def processes(self) -> int:
        return len(self.rows)

    def __call__(self, x0: mx.array, key: mx.array, *labels: mx.array) -> mx.array:
        if not self._finalizer.alive:
            raise RuntimeError("this data-parallel update is closed (closed by its caller, "
                               "or by a step that failed)")
        if x0.shape[0] != self.config.train.batch_size:
            raise ValueError(f"batch of {x0.shape[0]} rows: this update splits "
                             f"{self.config.train.batch_size}")
        seeds = np.asarray(mx.random.randint(0, 2**31 - 1, (self.processes,)))  # dropout
        self.params.write(self._weights, _leaves(self.model.parameters()))
        message = ("step", np.asarray(x0), np.asarray(key), [np.asarray(y) for y in labels])
        try:
            for peer, seed in zip(self._peers, seeds[1:]):
                peer.send((*message, int(seed)))
            mx.random.seed(int(seeds[0]))
            with blas_threads(1):
                loss, own = self.own(x0, key, *labels)
                mx.eval(loss, own)
            others, total = [], loss
            for peer, flat in zip(self._peers, self._peer_grads):
                total = total + peer.receive()
                others.append(tree_like(own, self.grads.read(flat)))
        except BaseException:
            self.close()  # an answer left unread would be taken for the next step's
            raise
        self._apply(own, *others)
        return total

    def close(self) -> None:
        """End the peer processes and free the shared memory (also at garbage collection).
        The update refuses steps after it."""
        self._weights, self._peer_grads = np.empty(0, np.float32), []  # no view outlives the map
        self._finalizer()


def _shut(peers: list[Peer], shm: SharedMemory) -> None:
    for peer in peers:
        peer.stop()
    shm.close()
    shm.unlink()


def _peer_main(conn: Connection, cfg: Config, rows: tuple[int, int], shm_name: str,
               grads_at: int) -> None:
    """A peer: rebuild the model, then per step read the weights, write the share's grads."""
    model = UNet(cfg.unet)
    model.checkpointing = cfg.train.checkpointing
    names = [k for k, _ in tree_flatten(model.parameters())]
    params = Layout(_leaves(model.parameters()))
    grads = Layout(_leaves(model.trainable_parameters()))
    grad_fn = _share_grad(model, cfg, rows)
    shm = SharedMemory(name=shm_name)
    views = [np.ndarray((grads_at + grads.size,), np.float32, shm.buf)]

    def step(message: tuple) -> float:
        _, x0, key, labels, seed = message
        flat = views[0]
        model.update(tree_unflatten(list(zip(names, params.read(flat[:params.size])))))
        mx.random.seed(seed)
        loss, g = grad_fn(mx.array(x0), mx.array(key), *map(mx.array, labels))
        mx.eval(loss, g)
        grads.write(flat[grads_at:], _leaves(g))
        return float(loss.item())

    try:
        serve(conn, step)
    finally:
        views.clear()  # no view may outlive the mapping
        shm.close()
