"""Samplers: one signature, chosen by name, random key passed in.

Every sampler is ``sample(denoise, x, grid, key, eta) -> x_0``: it starts from ``x``
(noise at ``grid.t[0]``), calls ``denoise(x_t, t) -> (x0, eps)`` once per step (twice
for none), and returns the sample at ``t = 0``. Deterministic samplers ignore ``key``.
"""

from __future__ import annotations

import atexit
import math
from collections.abc import Callable
from contextlib import nullcontext
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from engine.config import ScheduleConfig, UNetConfig
from engine.device.blas import blas_threads
from engine.device.contention import batch_scheduled
from engine.device.peers import Layout, Peer, process_count, serve, shares
from engine.model.unet import UNet
from engine.sampling.adaptive import sample_adaptive
from engine.sampling.diffusion import (
    Denoise,
    balanced_labels,
    cpu_streams,
    denoiser,
    num_classes_of,
)
from engine.sampling.schedules import Grid, grid

Sampler = Callable[[Denoise, mx.array, Grid, mx.array, float], mx.array]


def sample_ddim(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                eta: float = 0.0) -> mx.array:
    """DDIM (Song et al. 2021, eq. 12); ``eta = 1`` is DDPM's ancestral sampler."""
    keys = mx.random.split(key, max(grid.steps, 2))
    for i in range(grid.steps):
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        x0, eps = denoise(x, float(grid.t[i]))
        c = eta * math.sqrt(max((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2), 0.0))
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * mx.random.normal(x.shape, key=keys[i])
    return x


def sample_ddpm(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                eta: float = 1.0) -> mx.array:
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), i.e. DDIM with ``eta = 1``."""
    return sample_ddim(denoise, x, grid, key, eta=1.0)


def sample_euler(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                 eta: float = 0.0) -> mx.array:
    """Euler on the probability-flow ODE in ``x/alpha`` vs ``sigma/alpha`` (Karras et al. 2022, Alg. 1)."""
    for i in range(grid.steps):
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        _, eps = denoise(x, float(grid.t[i]))
        x_tilde = x / a_t + (s_s / a_s - s_t / a_t) * eps
        x = a_s * x_tilde
    return x


def sample_dpmpp_2m(denoise: Denoise, x: mx.array, grid: Grid, key: mx.array,
                    eta: float = 0.0) -> mx.array:
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Alg. 2)."""
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(grid.alpha, grid.sigma)]
    x0_prev, h_prev = None, None
    for i in range(grid.steps):
        s_t, a_s, s_s = float(grid.sigma[i]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        x0, _ = denoise(x, float(grid.t[i]))
        if s_s == 0.0:
            return x0  # the last step to t = 0 is first order: x_0 = D(x_t)
        h = lam[i + 1] - lam[i]
        d = x0
        if x0_prev is not None and h_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name; unknown names raise ``ValueError``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None


def generate(model: nn.Module, schedule: ScheduleConfig, n: int, seed: int, image_size: int,
             channels: int, clip_x0: bool = True, labels: mx.array | None = None) -> mx.array:
    """Draw ``n`` images (n, H, W, C) from ``model`` with the configured sampler and grid.

    A class-conditional ``model`` draws ``labels`` (default: every class equally often,
    :func:`engine.sampling.diffusion.balanced_labels`) under ``schedule.guidance``.

    ``adaptive`` integrates with per-sample step sizes instead of a grid
    (:func:`engine.sampling.adaptive.sample_adaptive`, at most ``schedule.steps`` evaluations).
    """
    k_noise, k_sample = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((n, image_size, image_size, channels), key=k_noise)
    if schedule.sampler == "adaptive":
        result = sample_adaptive(model, x, schedule.prediction, schedule.beta_schedule,
                                 atol=schedule.tolerance, rtol=schedule.tolerance,
                                 max_nfe=schedule.steps)
        return mx.clip(result.samples, -1.0, 1.0) if clip_x0 else result.samples
    processes = sample_processes(model, schedule, n)
    if processes > 1:
        return _generate_split(model, schedule, x, k_sample, clip_x0, labels, processes)
    # A batch split over CPU streams gives each stream one BLAS thread (diffusion.cpu_streams);
    # on one core, the thread that builds the graph yields to MLX's (batch_scheduled).
    with blas_threads(1) if min(cpu_streams(), n) > 1 else nullcontext(), batch_scheduled():
        out = _draw(model, schedule, x, k_sample, clip_x0, labels)
        mx.eval(out)
    return out


def _draw(model: nn.Module, schedule: ScheduleConfig, x: mx.array, key: mx.array,
          clip_x0: bool, labels: mx.array | None, streams: int | None = None) -> mx.array:
    """The grid sampler's chain from the noise ``x`` (lazy)."""
    denoise = denoiser(model, schedule.prediction, schedule.beta_schedule, clip_x0,
                       schedule.guidance, labels, streams)
    return get_sampler(schedule.sampler)(denoise, x, grid(schedule), key, schedule.eta)


# ------------------------------------------------- a batch's rows drawn by peer processes

SAMPLE_ENV = "DIFFNAS_SAMPLE_PROCESSES"
"""Processes a CPU sampling batch is split over; default: the thread budget."""

PER_SAMPLE = ("ddim", "euler", "dpmpp_2m")
"""Grid samplers whose every sample follows its own chain (DDIM at ``eta = 0``): drawn in
parts, the rows of a batch are those drawn whole. A stochastic step draws its noise for
the whole batch, so it stays in one process (split over CPU streams instead)."""


def sample_processes(model: nn.Module, schedule: ScheduleConfig, n: int) -> int:
    """How many processes draw a batch of ``n``: ``DIFFNAS_SAMPLE_PROCESSES`` if set, else
    the thread budget (:func:`engine.device.peers.process_count`); 1 off the CPU, for a
    stochastic or adaptive sampler, for a model that is not a float32 :class:`UNet` (a
    quantised one), and never more than ``n``.

    Each process runs the whole chain for its rows on one core: no exchange per step,
    where the stream split of :func:`engine.sampling.diffusion.compiled_forward` joins at
    every network call.
    """
    if (mx.default_device() != mx.cpu or n < 2 or schedule.sampler not in PER_SAMPLE
            or (schedule.sampler == "ddim" and schedule.eta > 0) or type(model) is not UNet):
        return 1
    k = process_count(SAMPLE_ENV)
    if k > 1 and any(v.dtype != mx.float32 for _, v in tree_flatten(model.parameters())):
        return 1
    return min(k, n)


_PEERS: list[Peer] = []
"""This process's sampling peers, started at first use and kept for later batches."""


def _peers(k: int) -> list[Peer]:
    """``k - 1`` live peers; one that died (its batch raised) is replaced."""
    for i, peer in enumerate(_PEERS):
        if not peer.process.is_alive():
            peer.stop()
            _PEERS[i] = Peer(_sample_peer, (), f"diffnas-sample-{i + 1}")
    while len(_PEERS) < k - 1:
        _PEERS.append(Peer(_sample_peer, (), f"diffnas-sample-{len(_PEERS) + 1}"))
    return _PEERS[:k - 1]


@atexit.register
def _stop_peers() -> None:
    while _PEERS:
        _PEERS.pop().stop()


def _generate_split(model: UNet, schedule: ScheduleConfig, x: mx.array, key: mx.array,
                    clip_x0: bool, labels: mx.array | None, k: int) -> mx.array:
    """:func:`generate`'s chain with the rows of ``x`` split over this process and ``k - 1``
    peers, which read the weights from shared memory."""
    n, classes = x.shape[0], num_classes_of(model)
    if labels is None and classes:
        labels = balanced_labels(n, classes)  # the whole batch's, then cut
    rows = shares(n, k)
    leaves = [v for _, v in tree_flatten(model.parameters())]
    layout = Layout(leaves)
    shm = SharedMemory(create=True, size=max(4 * layout.size, 4))
    try:
        layout.write(np.ndarray((layout.size,), np.float32, shm.buf), leaves)
        xs, ys = np.asarray(x), None if labels is None else np.asarray(labels)
        peers = _peers(k)
        for peer, (lo, hi) in zip(peers, rows[1:]):
            peer.send(("sample", model.config, model.training, schedule, shm.name, xs[lo:hi],
                       None if ys is None else ys[lo:hi], np.asarray(key), clip_x0))
        lo, hi = rows[0]
        with blas_threads(1):
            own = _draw(model, schedule, x[lo:hi], key, clip_x0,
                        None if labels is None else labels[lo:hi], streams=1)
            mx.eval(own)
        parts = [own, *(mx.array(peer.receive()) for peer in peers)]
    except BaseException:
        _stop_peers()  # an answer left unread would be taken for the next batch's rows
        raise
    finally:
        shm.close()
        shm.unlink()
    return mx.concatenate(parts)


def _sample_peer(conn: Connection) -> None:
    """A sampling peer: one U-Net per config, the weights of each request, its rows' chain."""
    models: dict[UNetConfig, tuple[UNet, list[str], Layout]] = {}

    def sample(message: tuple) -> np.ndarray:
        _, config, training, schedule, shm_name, x, y, key, clip_x0 = message
        if config not in models:
            model = UNet(config)
            named = tree_flatten(model.parameters())
            models[config] = model, [k for k, _ in named], Layout([v for _, v in named])
        model, names, layout = models[config]
        model.train(training)
        shm = SharedMemory(name=shm_name)
        try:
            if shm.size < 4 * layout.size:
                raise ValueError(f"{shm.size} bytes of weights for {4 * layout.size}")
            weights = layout.read(np.ndarray((layout.size,), np.float32, shm.buf))
        finally:
            shm.close()
        model.update(tree_unflatten(list(zip(names, weights))))
        out = _draw(model, schedule, mx.array(x), mx.array(key), clip_x0,
                    None if y is None else mx.array(y), streams=1)
        mx.eval(out)
        return np.asarray(out)

    serve(conn, sample)
