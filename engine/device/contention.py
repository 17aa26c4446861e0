"""What the kernel says about other processes on our cores, and holding a process still.

The steady latency protocol (:mod:`engine.device.steady`) uses these to tell a sample that
another process disturbed from a host that merely runs slower: a hog makes our threads
wait on the run queue and uses CPU on the cores we may run on; a slower host does neither.
Linux only (``/proc``); elsewhere every reader returns "unknown" and the probes alone judge.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from engine.device.blas import blas_threads


def run_queue_wait_ms() -> float:
    """Time this process's threads have spent ready to run but waiting for a CPU (ms; the
    second field of each thread's ``schedstat``). It grows while another process holds the
    core, not while the host merely runs slower. 0 where the kernel does not say (macOS)."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
    return total / 1e6


def _cpu_gap_ms() -> float:
    """Wall time minus this process's CPU time (ms): over an interval in which every thread
    of the process is pinned to one core and has work, the time that core ran others."""
    return (time.perf_counter() - time.process_time()) * 1e3


def lost_counter(pinned: bool) -> Callable[[], float]:
    """A counter (ms) of the time other processes took from this one. Pinned to one core,
    the wall-minus-CPU gap: run-queue wait would count our own threads waiting for each
    other there (MLX computes on its own thread: 1-5 ms a probe). Free to move, run-queue
    wait (on macOS nothing: the probes alone judge)."""
    return _cpu_gap_ms if pinned else run_queue_wait_ms


def on_core_clock(pinned: bool) -> Callable[[], float]:
    """The clock a steady measurement times on (seconds). Pinned on the CPU backend, the
    process's CPU time: every thread of the process is on one core and computes or waits
    for the other, so its CPU time is the time the core ran the model, which on a quiet core
    is the wall time (the demo's first model: 56.7 ms by both) and which a time slice given
    to another process does not lengthen (beside a hog on its core: 63-66 ms against 110-118
    ms of wall time, benchmarks/steady_latency.md). Otherwise wall time: a GPU computes while
    the host waits, and threads free to move may run at once."""
    if pinned and mx.default_device() == mx.cpu:
        return time.process_time
    return time.perf_counter


class CpuUse:
    """CPU time used on the cores this process may run on (taken when it is made, before the
    measurement pins its threads), by every process and by this one: their difference over
    a round is what other processes took from the cores we could use."""

    def __init__(self) -> None:
        try:
            self.cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cores = set()
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def busy_s(self) -> float | None:
        """CPU seconds every process (and the hypervisor's steal) used on our cores; None
        where unknown. ``/proc/stat``: user nice system idle iowait irq softirq steal."""
        if not self.cores:
            return None
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        ticks = 0
        for line in lines:
            name, *fields = line.split()
            if name in self.cores and len(fields) >= 8:
                f = [int(v) for v in fields[:8]]
                ticks += f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
        return ticks / self.hz

    def snapshot(self) -> tuple[float | None, float]:
        return self.busy_s(), time.process_time()

    @staticmethod
    def others(before: tuple[float | None, float], after: tuple[float | None, float],
               wall_s: float) -> float | None:
        """Cores' worth of CPU time other processes used between two snapshots."""
        if before[0] is None or after[0] is None or wall_s <= 0:
            return None
        return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


@contextlib.contextmanager
def held_still(pin: bool) -> Iterator[bool]:
    """No garbage collection pass inside a timed sample, and (``pin``, Linux) every thread
    of the process on the core the caller runs on, so that none migrates mid-sample.
    Pinned, OpenBLAS runs one thread: a second one on the same core would only take turns
    with the first (a demo DDIM-20 at batch 1 took 1093 ms pinned with two, against 195 ms).
    Yields whether the threads were pinned."""
    collecting = gc.isenabled()
    gc.disable()
    masks = _pin_threads() if pin else {}
    try:
        with blas_threads(1) if masks else contextlib.nullcontext():
            yield bool(masks)
    finally:
        for tid, mask in masks.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        if collecting:
            gc.enable()


@contextlib.contextmanager
def batch_scheduled() -> Iterator[None]:
    """The calling thread under ``SCHED_BATCH`` while this process may run on one core only
    (Linux; elsewhere, or on more cores, nothing changes).

    MLX builds the graph on the caller's thread and computes on a thread of its own, waking
    the caller every ten ops. On one core each wake-up preempted the computing thread: about
    4,900 context switches per DDIM-20 run of the demo at batch 1. A ``SCHED_BATCH`` thread
    does not preempt when woken, so it encodes more ops a turn: 480 switches, and the run
    8-12% faster (98.2 -> 86.3 ms, 110.5 -> 101.5 ms, two in-process A/Bs on the 2-core VM;
    batch 16 and a training step within 1-2%). On two cores the same policy made batch 1
    14% slower, hence one core only (benchmarks/cpu_speed.md).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    try:
        alone = policy is not None and len(os.sched_getaffinity(0)) == 1 \
            and os.sched_getscheduler(0) == os.SCHED_OTHER
    except (AttributeError, OSError):
        alone = False
    if not alone:
        yield
        return
    os.sched_setscheduler(0, policy, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def current_core() -> int | None:
    """The core this thread runs on now (Linux: ``/proc/thread-self/stat``), else None."""
    try:
        return int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _pin_threads() -> dict[int, set[int]]:
    """Pin every thread (MLX computes on its own) to this thread's core; their old masks."""
    core = current_core()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return {}
    if core is None:
        return {}  # not Linux: macOS keeps its own scheduling
    masks = {}
    for tid in tids:
        with contextlib.suppress(OSError):
            masks[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {core})
    return masks
