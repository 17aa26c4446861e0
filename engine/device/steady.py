"""The steady latency protocol: a latency that holds on a busy machine (a trial's objective).

Each timed sample (the call run back to back for at least :data:`MIN_WINDOW_MS`, per call)
sits between two probes of a fixed reference workload (interleaved: probe, sample, probe,
sample, ..., probe). Two kinds of signal say whether a sample was disturbed:

- **Run-queue wait** (Linux: ``/proc/self/task/*/schedstat``, field 2): the time this
  process's threads were ready to run but waited for a CPU that another process held. A
  CPU hog on the core shows here directly; a host that merely runs slower does not. A
  sample (or a probe beside it) that waited more than :data:`WAIT_TOLERANCE` of its time
  shared its core.
- **The probes**: a probe further than :data:`REFERENCE_TOLERANCE` from the calibrated
  reference time says the machine was not as usual (contention that run-queue wait cannot
  see: a hyperthread sibling, memory bandwidth, macOS).

The calibration follows the host's own speed: a *settled* round (no other process used
our cores, :data:`QUIET_OTHERS`; no probe waited; the probes agree with each other) shows
the machine as it is now, and its median probe becomes the calibration, however far from
the old one (re-calibration). A CPU hog never makes a round settled, so it never moves the
calibration. Each sample is scaled by the machine's usual reference time over the
calibration it was judged by: the latency is the one at the host's usual speed, whichever
speed it ran at (``LatencyStat.host_slowdown`` keeps the factor). Disturbed samples are set
aside; a round with one is followed by a pause;
clean samples are pooled until the 95% confidence interval of their median is within
:data:`TARGET_CI`, up to :data:`MAX_ROUNDS` rounds; too few clean samples, or an interval
still wider at the last round, is recorded as ``disturbed``. While it times, the process collects
no garbage and its threads stay on one core; on the CPU backend, samples and probes are
then timed on the process's CPU time (:func:`engine.device.contention.on_core_clock`), which
a time slice given to another process does not lengthen.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.device.bench import LatencyStat, device_fingerprint
from engine.device.contention import CpuUse, held_still, lost_counter, on_core_clock

REFERENCE_TOLERANCE = 0.10
"""A probe this much slower or faster than calibrated says the machine was not as usual."""
WAIT_TOLERANCE = 0.02
"""A sample or probe whose threads waited on the run queue for more than this share of its
time shared its core with another process (a hog on the core: 30-70%)."""
QUIET_OTHERS = 0.25
"""A round in which other processes used at most this many cores' worth of CPU time on the
cores this process may run on (and no probe waited) shows the host's own speed."""
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


def reference_workload() -> Callable[[], None]:
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

    Two calibrations. The machine's *usual* time (:attr:`usual_ms`) is the 25th percentile
    of the last :attr:`KEEP` values in ``store`` (a JSON file in the temp folder, one per
    device fingerprint): each process's own calibration (the fastest of three medians of 5
    probes) and the median probe of each round whose probes did not wait on the run queue
    and were no slower than usual, or that was settled (:meth:`learn`). So a process that
    starts under load still compares with the machine's usual time. The *current*
    calibration (:attr:`calibrated_ms`) is the last settled round's median probe in this
    process (:meth:`Round.settled`), else the usual time: it follows the host's own speed,
    which drifts by up to 35% for minutes with nothing else running
    (benchmarks/steady_latency.md), while a CPU hog, however long it runs, never moves it.
    """

    KEEP = 64

    def __init__(self, store: Path | None = None, workload: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.store = store or _reference_store()
        self.run = workload or reference_workload()
        self.clock = clock
        self._usual: float | None = None
        self._settled: float | None = None

    @property
    def usual_ms(self) -> float:
        """The reference's usual time on this machine (ms); calibrated on first use, in the
        probes' own terms (:meth:`probe`: the faster of two runs), so that a probe on a
        quiet machine reads 1."""
        if self._usual is None:
            self.run()
            self._remember(min(float(np.median([self.probe()[0] for _ in range(5)]))
                               for _ in range(3)))
        assert self._usual is not None
        return self._usual

    @property
    def calibrated_ms(self) -> float:
        """What a probe should read now: the last settled round's median, else usual."""
        return self._settled if self._settled is not None else self.usual_ms

    def _remember(self, ms: float) -> None:
        history = (_read_json(self.store) + [ms])[-self.KEEP:]
        _write_json(self.store, history)
        self._usual = float(np.percentile(history, 25))

    def probe(self, lost: Callable[[], float] = lambda: 0.0,
              clock: Callable[[], float] | None = None) -> tuple[float, float]:
        """A quick look at the machine between two timed samples: the faster of two runs of
        the reference (ms, on ``clock``, default the reference's own; one run alone strays on
        a quiet machine) and the time the two runs lost to other processes (``lost``: a
        counter in ms, :func:`lost_counter`) as a share of their time on ``clock``."""
        clock = clock or self.clock
        start, before = clock(), lost()
        ms = min(_once(self.run, clock) for _ in range(2))
        return ms, _share(lost() - before, (clock() - start) * 1e3)

    def learn(self, taken: Round) -> None:
        """Follow a settled round (see the class docstring); remember, as usual, a round
        whose probes did not wait and were no slower than usual."""
        settled = taken.settled()
        if settled is not None:
            self._settled = settled
            self._remember(settled)
            return
        median = float(np.median(taken.probes()))
        if taken.probes_waited() <= WAIT_TOLERANCE and \
                median <= self.usual_ms * (1 + REFERENCE_TOLERANCE):
            self._remember(median)


def _share(part_ms: float, whole_ms: float) -> float:
    return part_ms / whole_ms if whole_ms > 0 else 0.0


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
_LAST: tuple[tuple[Round, ...], float, float, int] = ((), 1.0, 1.0, MAX_ROUNDS)  # last_measurement()


@dataclass(frozen=True)
class Sample:
    """One timed sample and the reference probes on either side of it (ms), each with the
    share of its time that the process's threads waited on the run queue."""

    ms: float
    before_ms: float
    after_ms: float
    wait: float = 0.0
    before_wait: float = 0.0
    after_wait: float = 0.0

    def ratio(self, calibrated_ms: float) -> float:
        """The probe furthest from the calibration, over it: how disturbed the machine
        looked around the sample."""
        return max(self.before_ms / calibrated_ms, self.after_ms / calibrated_ms,
                   key=lambda r: abs(r - 1))

    def waited(self) -> float:
        """The largest run-queue wait share of the sample and its two probes."""
        return max(self.wait, self.before_wait, self.after_wait)

    def disturbance(self, calibrated_ms: float) -> float:
        """How far from clean: the larger of the wait share and the probes' stray."""
        return max(self.waited(), abs(self.ratio(calibrated_ms) - 1))

    def clean(self, calibrated_ms: float) -> bool:
        """Neither it nor its probes waited for the CPU, and both probes are within
        :data:`REFERENCE_TOLERANCE` of the calibration."""
        return self.waited() <= WAIT_TOLERANCE and \
            abs(self.ratio(calibrated_ms) - 1) <= REFERENCE_TOLERANCE


@dataclass(frozen=True)
class Round:
    """A round's samples and the CPU other processes took from our cores meanwhile (cores'
    worth; None where unknown)."""

    samples: tuple[Sample, ...]
    others: float | None = None

    def probes(self) -> list[float]:
        return [s.before_ms for s in self.samples] + [self.samples[-1].after_ms]

    def probes_waited(self) -> float:
        return max(max(s.before_wait, s.after_wait) for s in self.samples)

    def settled(self) -> float | None:
        """The median probe, when the round shows the host's own speed: no other process used
        more than :data:`QUIET_OTHERS` of our cores, nothing waited on the run queue, and the
        probes agree within :data:`REFERENCE_TOLERANCE`; else None. A hog fails the first
        two, a burst the last."""
        probes = self.probes()
        if self.others is None or self.others > QUIET_OTHERS or \
                max(s.waited() for s in self.samples) > WAIT_TOLERANCE or \
                max(probes) > min(probes) * (1 + REFERENCE_TOLERANCE):
            return None
        return float(np.median(probes))


def steady_call(fn: Callable[[], Any], runs: int = 5, reference: Reference | None = None,
                pause: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] | None = None, pin: bool = True,
                cpu: CpuUse | None = None, lost: Callable[[], float] | None = None,
                max_rounds: int = MAX_ROUNDS) -> LatencyStat:
    """Samples of ``fn`` interleaved with probes of the reference workload, in rounds until
    the clean ones pin the median down (see the module docstring).

    Args:
        fn: the call to time; it must ``mx.eval`` its result.
        runs: samples per round (at least 5).
        reference: the reference workload (default: this process's, calibrated once).
        pause: how to wait after a round with a disturbed sample.
        clock: the clock ``fn`` and the probes beside it are timed on (default:
            :func:`on_core_clock`); the reference's calibration keeps its own.
        pin: keep the process's threads on the core it runs on while timing (Linux).
        cpu: what other processes take from our cores (default: read from ``/proc/stat``).
        lost: a counter (ms) of the time other processes took from this one (default:
            :func:`lost_counter`).
        max_rounds: the most rounds taken (:data:`MAX_ROUNDS`); a study that trades
            confidence for time may take fewer (``[evaluate] latency_rounds``).

    Returns:
        :func:`decide` of every round taken.
    """
    reference = reference or _process_reference()
    cpu = cpu or CpuUse()  # before pinning: the cores we may use
    start = reference.calibrated_ms  # first, unpinned: as every process calibrates
    usual = reference.usual_ms
    taken: list[Round] = []
    with held_still(pin) as pinned:
        lost = lost or lost_counter(pinned)
        clock = clock or on_core_clock(pinned)
        while len(taken) < max_rounds:
            fn()  # warm-up: compile and first touch stay out of the samples
            taken.append(_round(fn, max(runs, 5), reference, clock, cpu, lost))
            reference.learn(taken[-1])
            stat = decide(taken, start, runs, usual, max_rounds)
            if not stat.disturbed and stat.ci <= TARGET_CI:
                break
            if len(taken) < max_rounds and not _round_clean(taken, start):
                pause(PAUSES_S[min(stat.disturbed_rounds, len(PAUSES_S)) - 1])
    global _LAST
    _LAST = (tuple(taken), start, usual, max_rounds)
    return stat


def last_measurement() -> tuple[tuple[Round, ...], float, float, int]:
    """This process's last :func:`steady_call`: its rounds, the calibration it started with,
    the usual reference time (ms) and the most rounds it could take, so that a benchmark can
    judge them again (:func:`decide`'s arguments)."""
    return _LAST


def _round_clean(taken: list[Round], start_ms: float) -> bool:
    """Whether the last round's samples were all clean, judged as :func:`decide` does."""
    return all(s.clean(c) for s, c in _judged(taken, start_ms)[-len(taken[-1].samples):])


def _round(fn: Callable[[], Any], runs: int, reference: Reference,
           clock: Callable[[], float], cpu: CpuUse, lost: Callable[[], float]) -> Round:
    """``runs`` samples, each between two probes (a probe serves the samples on both sides)."""
    began, before = clock(), cpu.snapshot()
    probes = [reference.probe(lost, clock)]
    times = []
    for _ in range(runs):
        was, start = lost(), clock()
        ms = window_ms(fn, clock)
        times.append((ms, _share(lost() - was, (clock() - start) * 1e3)))
        probes.append(reference.probe(lost, clock))
    others = CpuUse.others(before, cpu.snapshot(), clock() - began)
    return Round(tuple(Sample(ms, probes[i][0], probes[i + 1][0], wait, probes[i][1],
                              probes[i + 1][1]) for i, (ms, wait) in enumerate(times)), others)


def _judged(rounds: list[Round], calibrated_ms: float) -> list[tuple[Sample, float]]:
    """Every sample with the calibration it is judged by: the last settled round's median
    probe up to and including its own round, else ``calibrated_ms``."""
    judged = []
    for r in rounds:
        calibrated_ms = r.settled() or calibrated_ms
        judged += [(s, calibrated_ms) for s in r.samples]
    return judged


def decide(rounds: list[Round], calibrated_ms: float, runs: int = 5,
           usual_ms: float | None = None, max_rounds: int | None = None) -> LatencyStat:
    """The latency that the samples taken in ``rounds`` support (pure: nothing is timed).

    A sample is clean when neither it nor its probes waited on the run queue and both probes
    are within :data:`REFERENCE_TOLERANCE` of the calibration (``calibrated_ms``, or the
    median probe of the last settled round so far: :meth:`Round.settled`). With at least
    ``runs`` clean samples, the latency is their median. With fewer, the machine never held
    still long enough: the ``runs`` least disturbed samples give the latency, marked
    ``disturbed``. Taken to the last of ``max_rounds`` rounds (the cap they were taken
    under; None: not known), clean samples whose median's confidence interval is still wider
    than :data:`TARGET_CI` are marked ``disturbed`` too: the machine moved under them all the
    while. On the 2-core VM beside two CPU hogs, a model's clean samples of 6 rounds read
    +42% over its quiet latency with a +-8.6% interval, unmarked, before this rule
    (benchmarks/steady_latency.md).

    Each sample is scaled to the machine's usual speed: by ``usual_ms`` (the reference's
    usual time, :attr:`Reference.usual_ms`; default ``calibrated_ms``) over the calibration
    it was judged by. A settled round moves the calibration only when the host itself runs
    faster or slower (never for a hog), and the reference, run on MLX's stream like the
    model, slows with it: on an idle host the same model ran at about 60 and about 98 ms in
    turn, its probes moving with it (benchmarks/steady_latency.md). Scaled, a latency
    compares with one taken in the other speed mode; ``host_slowdown`` keeps the factor.

    Returns:
        The :class:`LatencyStat`; ``disturbed_rounds`` counts rounds with a disturbed sample,
        ``reference_ratio`` is the probe furthest from 1 beside the samples kept,
        ``wait_share`` their median run-queue wait share and ``reference_shift`` the last
        calibration over ``calibrated_ms``.
    """
    usual = usual_ms or calibrated_ms
    judged = _judged(rounds, calibrated_ms)
    clean = [(s, c) for s, c in judged if s.clean(c)]
    too_few = len(clean) < runs
    kept = sorted(judged, key=lambda sc: sc[0].disturbance(sc[1]))[:runs] if too_few \
        else clean
    samples = [s.ms * usual / c for s, c in kept]
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    ci = median_ci(samples)
    capped = max_rounds is not None and len(rounds) >= max_rounds
    disturbed = too_few or (capped and ci > TARGET_CI)
    ratio = max((s.ratio(c) for s, c in kept), key=lambda r: abs(r - 1))
    bounds = np.cumsum([0] + [len(r.samples) for r in rounds])
    dirty = sum(not all(s.clean(c) for s, c in judged[a:b]) for a, b in itertools.pairwise(bounds))
    return LatencyStat(float(med), float((q3 - q1) / med), tuple(samples), ci,
                       len(rounds), dirty, ratio, disturbed,
                       float(np.median([s.wait for s, _ in kept])),
                       judged[-1][1] / calibrated_ms,
                       float(np.median([c / usual for _, c in kept])))


def _process_reference() -> Reference:
    """This process's reference workload, calibrated on first use."""
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = Reference()
    return _REFERENCE
