"""Latency, throughput and peak memory, measured by one protocol everywhere.

Latency: warm up (compile and first-touch excluded), then the median of at least 5
runs, each synchronised with ``mx.eval``; the relative spread (IQR / median) is
reported and the measurement repeated when it exceeds 10%. Memory: peak bytes
between ``mx.reset_peak_memory()`` and ``mx.get_peak_memory()``. Every record carries
the device fingerprint.

A latency that has to hold on a busy machine (a trial's objective) is taken by the steady
protocol, :func:`engine.device.steady.steady_call`, which reports it as a
:class:`LatencyStat` too.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.config import LIMITS, Config
from engine.device import blas as _blas
from engine.device.peers import one_process
from engine.model.cost import flops
from engine.model.unet import UNet
from engine.sampling.samplers import generate
from engine.training.train import init_state, stand_in_labels, train

MAX_SPREAD = 0.10


def _cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or platform.machine()
        except OSError:
            return platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def device_fingerprint() -> dict[str, Any]:
    """Chip or CPU, backend (metal, cuda or cpu), memory, MLX version and BLAS in use."""
    device = mx.default_device()
    if device.type == mx.gpu:
        backend = "metal" if sys.platform == "darwin" else "cuda"
        try:
            chip = str(mx.device_info().get("device_name", _cpu_name()))
        except Exception:  # older MLX has no device_info
            chip = _cpu_name()
    else:
        backend, chip = "cpu", _cpu_name()
    return {"chip": chip, "backend": backend, "memory_gb": _memory_gb(), "mlx": mx.__version__,
            "blas": _blas.BLAS_NAME if backend == "cpu" else "n/a",
            "cores": os.cpu_count(), "platform": f"{platform.system()}-{platform.machine()}"}


@dataclass(frozen=True)
class LatencyStat:
    """Median of ``samples_ms`` and its relative spread (IQR / median).

    Set by :func:`engine.device.steady.steady_call` (defaults: a plain :func:`time_call`):
    ``ci``, the relative half-width of the median's 95% confidence interval; ``rounds``, the
    rounds timed; ``disturbed_rounds``, those with a sample set aside because a reference
    probe beside it strayed; ``reference_ratio``, the reference's time beside the kept
    samples over its calibrated time (the one furthest from 1); ``disturbed``, too few
    samples were clean, so the samples are the least disturbed ones, or the clean ones'
    interval stayed wider than the protocol's target to its last round; ``wait_share``, the
    median share of the kept samples' time that the process waited on the run queue (a CPU
    hog on its core); ``reference_shift``, the calibration the last round was judged by over
    the one the measurement started with (the host's own speed moved); ``host_slowdown``,
    the kept samples' calibration over the machine's usual reference time: the factor the
    samples (and so the median) were divided by, to the machine's usual speed.
    """

    median_ms: float
    spread: float
    samples_ms: tuple[float, ...]
    ci: float = 0.0
    rounds: int = 1
    disturbed_rounds: int = 0
    reference_ratio: float = 1.0
    disturbed: bool = False
    wait_share: float = 0.0
    reference_shift: float = 1.0
    host_slowdown: float = 1.0


def time_call(fn: Callable[[], Any], runs: int = 5, warmup: int = 1, retries: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> LatencyStat:
    """Median time of ``fn`` (which must ``mx.eval`` its result), re-measured if noisy.

    ``clock`` is wall time by default; ``time.process_time`` gives CPU time.
    """
    best: LatencyStat | None = None
    for _ in range(retries + 1):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(max(runs, 5)):
            start = clock()
            fn()
            samples.append((clock() - start) * 1e3)
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        stat = LatencyStat(float(med), float((q3 - q1) / med), tuple(samples))
        if best is None or stat.spread < best.spread:
            best = stat
        if stat.spread <= MAX_SPREAD:
            break
    assert best is not None
    return best


def sampling_latency(model: nn.Module, config: Config, batch: int = 1, runs: int = 5) -> LatencyStat:
    """Time to draw ``batch`` images with the configured sampler and step count."""
    u = config.unet
    return time_call(lambda: generate(model, config.schedule, batch, 0, u.image_size, u.channels),
                     runs=runs)


def _peak_mb(fn: Callable[[], Any]) -> float:
    """This process's peak (MB) over ``fn``, run whole here (no peer processes)."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    with one_process():
        fn()
    mx.synchronize()
    return mx.get_peak_memory() / 2**20


def sampling_peak_mb(model: nn.Module, config: Config, batch: int) -> float:
    """Peak memory (MB) while sampling ``batch`` images, weights included."""
    u = config.unet
    return _peak_mb(lambda: generate(model, config.schedule, batch, 0, u.image_size, u.channels))


def training_peak_mb(config: Config, batch: int | None = None, steps: int = 2) -> float:
    """Peak memory (MB) of training steps at ``batch`` (default: the config's batch size)."""
    config = _with_batch(config, batch)
    images = np.zeros((max(config.train.batch_size, 8),) + _shape(config), np.float32)

    def run() -> None:
        train(init_state(config), images, images[:8], until=steps,
              labels=stand_in_labels(config, len(images), 8))

    return _peak_mb(run)


def train_throughput(config: Config, steps: int = 10, warmup: int = 2) -> float:
    """Training images per second at the config's batch size, compile time excluded."""
    images = np.zeros((config.train.batch_size,) + _shape(config), np.float32)
    cfg = _with_batch(config, None, eval_every=int(LIMITS["train_steps"]))  # no validation
    state, labels = init_state(cfg), stand_in_labels(cfg, len(images), 8)
    train(state, images, images[:8], until=warmup, labels=labels)
    start = time.perf_counter()
    train(state, images, images[:8], until=warmup + steps, labels=labels)
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def _shape(config: Config) -> tuple[int, int, int]:
    u = config.unet
    return (u.image_size, u.image_size, u.channels)


def _with_batch(config: Config, batch: int | None, eval_every: int | None = None) -> Config:
    train_cfg = config.train
    train_cfg = replace(train_cfg, batch_size=batch or train_cfg.batch_size,
                        steps=max(train_cfg.steps, 10**6),
                        eval_every=eval_every or train_cfg.eval_every)
    return replace(config, train=train_cfg)


@dataclass(frozen=True)
class BenchRecord:
    """What ``diffnas bench`` prints: latency, throughput, peak memory, device."""

    latency_b1: LatencyStat
    latency_bn: LatencyStat
    batch_n: int
    train_images_per_s: float
    peak_train_mb: float
    peak_sample_b1_mb: float
    peak_sample_bn_mb: float
    params: int
    gflops_per_forward: float
    device: dict[str, Any] = field(default_factory=device_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench(config: Config, batch_n: int = 16, model: UNet | None = None) -> BenchRecord:
    """Measure one config (random or given weights: speed does not depend on them)."""
    if model is None:
        model = UNet(config.unet)
        mx.eval(model.parameters())
    return BenchRecord(
        latency_b1=sampling_latency(model, config, 1),
        latency_bn=sampling_latency(model, config, batch_n),
        batch_n=batch_n,
        train_images_per_s=train_throughput(config),
        peak_train_mb=training_peak_mb(config),
        peak_sample_b1_mb=sampling_peak_mb(model, config, 1),
        peak_sample_bn_mb=sampling_peak_mb(model, config, batch_n),
        params=model.num_params(),
        gflops_per_forward=flops(config.unet) / 1e9,
    )


def forward_latency(model: UNet, config: Config, batch: int = 1) -> LatencyStat:
    """Latency of one network evaluation: the unit the step budget is counted in."""
    u = config.unet
    x = mx.random.normal((batch, u.image_size, u.image_size, u.channels))
    t = mx.full((batch,), 0.5)
    return time_call(lambda: mx.eval(model(x, t)))
