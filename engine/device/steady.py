"""The steady latency protocol: a latency that holds on a busy machine (a trial's objective).

Each timed sample (the call run back to back for at least :data:`MIN_WINDOW_MS`, per call)
sits between two probes of a fixed reference workload (interleaved: probe, sample, probe,
sample, ..., probe); a sample whose probes stray from the reference's calibrated time by
more than :data:`REFERENCE_TOLERANCE` was disturbed (another process took the CPU) and is
set aside; a round with a disturbed sample is followed by a pause; clean samples are pooled
until the 95% confidence interval of their median is within :data:`TARGET_CI`, up to
:data:`MAX_ROUNDS` rounds. While it times, the process collects no garbage and its threads
stay on one core.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.device.bench import LatencyStat, device_fingerprint

REFERENCE_TOLERANCE = 0.10
"""A round whose reference workload ran this much slower or faster than calibrated is
disturbed."""
TARGET_CI = 0.05
"""Clean rounds are pooled until the median's 95% confidence interval is within +-5%."""
MAX_ROUNDS = 6
MIN_WINDOW_MS = 25.0
"""A timed sample runs the call back to back for at least this long: one sampling run of a
small model takes a few ms, where a scheduler tick or a timer read is a large share."""
PAUSES_S = (0.1, 0.2, 0.5, 1.0, 1.0)
"""Waits before taking a disturbed round again: a short burst passes, a long one is recorded
as disturbed. At most 2.8 s in all: a trial pays these on every measurement, and longer
waits (11.5 s in all) tripled a smoke trial's wall time without meeting the targets on this
VM any better (benchmarks/steady_latency.md)."""


def median_ci(samples_ms: tuple[float, ...] | list[float]) -> float:
    """Relative half-width of the 95% confidence interval of the median (order statistics,
    distribution-free: ranks n/2 -+ 0.98 sqrt(n))."""
    ordered = sorted(samples_ms)
    n = len(ordered)
    lo = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    hi = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)) - 1)
    return float((ordered[hi] - ordered[lo]) / (2 * np.median(ordered)))


def _reference_workload() -> Callable[[], None]:
    """A fixed mix of what a U-Net runs, 3x3 convolutions and a matmul: about 5 ms with
    OpenBLAS on one x86 core, long enough to span several scheduler time slices. Its arrays
    are made inside each run, so that none is alive while memory is measured."""
    key = mx.random.key(0)

    def run() -> None:
        y = mx.random.normal((1, 48, 48, 32), key=key)
        w = 0.05 * mx.random.normal((32, 3, 3, 32), key=key)
        m = mx.random.normal((192, 192), key=key)
        for _ in range(10):
            y = mx.conv2d(y, w, padding=1)
        mx.eval(y, m @ m)

    return run


class Reference:
    """The reference workload and its calibrated time on this machine.

    The calibration is the 25th percentile of the last :attr:`KEEP` values in ``store`` (a
    JSON file in the temp folder, one per device fingerprint): each process's own
    calibration (the fastest of three medians of 5 probes), and the median probe of each
    round that found the machine no slower than calibrated (:meth:`learn`). So a process
    that starts under load still compares with the machine's usual time, and a calibration
    taken under load is corrected by the quieter rounds after it, while a CPU hog, however
    long it runs, never raises it.
    """

    KEEP = 64

    def __init__(self, store: Path | None = None, workload: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.store = store or _reference_store()
        self.run = workload or _reference_workload()
        self.clock = clock
        self._calibrated: float | None = None

    @property
    def calibrated_ms(self) -> float:
        """The reference's usual time on this machine (ms); calibrated on first use, in the
        probes' own terms (:meth:`probe`: the faster of two runs), so that a probe on a
        quiet machine reads 1."""
        if self._calibrated is None:
            self.run()
            self._remember(min(float(np.median([self.probe() for _ in range(5)]))
                               for _ in range(3)))
        assert self._calibrated is not None
        return self._calibrated

    def _remember(self, ms: float) -> None:
        history = (_read_json(self.store) + [ms])[-self.KEEP:]
        _write_json(self.store, history)
        self._calibrated = float(np.percentile(history, 25))

    def probe(self) -> float:
        """A quick look at the machine between two timed samples: the faster of two runs of
        the reference (ms; one run alone strays on a quiet machine)."""
        return min(_once(self.run, self.clock) for _ in range(2))

    def learn(self, probes_ms: list[float]) -> None:
        """Add the median of a round's probes to the history when it is within
        :data:`REFERENCE_TOLERANCE` of the calibration or faster (see the class docstring)."""
        median = float(np.median(probes_ms))
        if median <= self.calibrated_ms * (1 + REFERENCE_TOLERANCE):
            self._remember(median)


def _once(fn: Callable[[], Any], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1e3


def window_ms(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter,
              min_ms: float = MIN_WINDOW_MS) -> float:
    """Time per call of ``fn`` run back to back until at least ``min_ms`` have passed."""
    start, count = clock(), 0
    while True:
        fn()
        count += 1
        elapsed = (clock() - start) * 1e3
        if elapsed >= min_ms:
            return elapsed / count


REFERENCE_VERSION = 3
"""Part of the calibration store's name: a changed workload or statistic (3: the probe's,
the faster of two runs) must not meet old times."""


def _reference_store() -> Path:
    fp = device_fingerprint()
    blas = fp["blas"].split(" (")[0]  # the library, not its path: every checkout shares it
    key = hashlib.sha256(json.dumps([REFERENCE_VERSION, fp["chip"], fp["backend"], blas,
                                     fp["mlx"]]).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"diffnas-reference-{key}.json"


def _read_json(path: Path) -> list[float]:
    try:
        return [float(v) for v in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _write_json(path: Path, values: list[float]) -> None:
    """Write atomically (several processes calibrate); a lost race loses one value."""
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(values, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass


_REFERENCE: Reference | None = None


@dataclass(frozen=True)
class Sample:
    """One timed sample and the reference probes on either side of it (ms)."""

    ms: float
    before_ms: float
    after_ms: float

    def ratio(self, calibrated_ms: float) -> float:
        """The probe furthest from the calibration, over it: how disturbed the machine
        looked around the sample."""
        return max(self.before_ms / calibrated_ms, self.after_ms / calibrated_ms,
                   key=lambda r: abs(r - 1))

    def clean(self, calibrated_ms: float) -> bool:
        """Both probes within :data:`REFERENCE_TOLERANCE` of the calibration."""
        return abs(self.ratio(calibrated_ms) - 1) <= REFERENCE_TOLERANCE


def steady_call(fn: Callable[[], Any], runs: int = 5, reference: Reference | None = None,
                pause: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.perf_counter, pin: bool = True
                ) -> LatencyStat:
    """Samples of ``fn`` interleaved with probes of the reference workload, in rounds until
    the clean ones pin the median down (see the module docstring).

    Args:
        fn: the call to time; it must ``mx.eval`` its result.
        runs: samples per round (at least 5).
        reference: the reference workload (default: this process's, calibrated once).
        pause: how to wait after a round with a disturbed sample.
        clock: the clock ``fn`` is timed on (the reference keeps its own).
        pin: keep the process's threads on the core it runs on while timing (Linux).

    Returns:
        :func:`decide` of every sample taken.
    """
    reference = reference or _process_reference()
    calibrated = reference.calibrated_ms  # first, unpinned: as every process calibrates
    taken: list[list[Sample]] = []
    with _held_still(pin):
        while len(taken) < MAX_ROUNDS:
            fn()  # warm-up: compile and first touch stay out of the samples
            taken.append(_round(fn, max(runs, 5), reference, clock))
            reference.learn([p for s in taken[-1] for p in (s.before_ms, s.after_ms)])
            calibrated = reference.calibrated_ms
            stat = decide(taken, calibrated, runs)
            if not stat.disturbed and stat.ci <= TARGET_CI:
                break
            if len(taken) < MAX_ROUNDS and not all(s.clean(calibrated) for s in taken[-1]):
                pause(PAUSES_S[min(stat.disturbed_rounds, len(PAUSES_S)) - 1])
    return stat


def _round(fn: Callable[[], Any], runs: int, reference: Reference,
           clock: Callable[[], float]) -> list[Sample]:
    """``runs`` samples, each between two probes (a probe serves the samples on both sides)."""
    probes = [reference.probe()]
    times = []
    for _ in range(runs):
        times.append(window_ms(fn, clock))
        probes.append(reference.probe())
    return [Sample(ms, probes[i], probes[i + 1]) for i, ms in enumerate(times)]


def decide(rounds: list[list[Sample]], calibrated_ms: float, runs: int = 5) -> LatencyStat:
    """The latency that the samples taken in ``rounds`` support (pure: nothing is timed).

    A sample is clean when both probes beside it are within :data:`REFERENCE_TOLERANCE` of
    ``calibrated_ms``. With at least ``runs`` clean samples, the latency is their median.
    With fewer, the machine never held still long enough: the ``runs`` least disturbed
    samples give the latency, marked ``disturbed``.

    Returns:
        The :class:`LatencyStat`; ``disturbed_rounds`` counts rounds with a disturbed sample
        and ``reference_ratio`` is the probe furthest from 1 beside the samples kept.
    """
    every = [s for r in rounds for s in r]
    clean = [s for s in every if s.clean(calibrated_ms)]
    disturbed = len(clean) < runs
    kept = sorted(every, key=lambda s: abs(s.ratio(calibrated_ms) - 1))[:runs] if disturbed \
        else clean
    samples = [s.ms for s in kept]
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    ratio = max((s.ratio(calibrated_ms) for s in kept), key=lambda r: abs(r - 1))
    return LatencyStat(float(med), float((q3 - q1) / med), tuple(samples), median_ci(samples),
                       len(rounds), sum(not all(s.clean(calibrated_ms) for s in r)
                                        for r in rounds), ratio, disturbed)


@contextlib.contextmanager
def _held_still(pin: bool) -> Iterator[None]:
    """No garbage collection pass inside a timed sample, and (``pin``, Linux) every thread
    of the process on the core the caller runs on, so that none migrates mid-sample."""
    collecting = gc.isenabled()
    gc.disable()
    masks = _pin_threads() if pin else {}
    try:
        yield
    finally:
        for tid, mask in masks.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        if collecting:
            gc.enable()


def _pin_threads() -> dict[int, set[int]]:
    """Pin every thread (MLX computes on its own) to this thread's core; their old masks."""
    try:
        core = int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except (OSError, ValueError, IndexError):
        return {}  # not Linux: macOS keeps its own scheduling
    masks = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            masks[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {core})
    return masks


def _process_reference() -> Reference:
    """This process's reference workload, calibrated on first use."""
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = Reference()
    return _REFERENCE
