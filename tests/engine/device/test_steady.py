"""The steady latency protocol (engine.device.steady.steady_call) on a scripted clock: a
reference workload that runs slow while the machine is 'disturbed' must make the round be
taken again after a pause, and a disturbance that never ends must be recorded as such."""

import gc
import json
import os
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from pytest import approx

from engine.device.contention import CpuUse, held_still, run_queue_wait_ms
from engine.device.steady import (
    MAX_ROUNDS,
    MIN_WINDOW_MS,
    PAUSES_S,
    TARGET_CI,
    WAIT_TOLERANCE,
    Reference,
    Round,
    Sample,
    decide,
    last_measurement,
    median_ci,
    steady_call,
    window_ms,
)


class Clock:
    """Time that moves only when a workload says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


class Machine:
    """The reference takes 10 ms, or 20 ms while ``busy`` rounds of pauses remain; the
    measured call takes 50, 51, 49, 50, 50 ms (and 100 ms while busy: it is slowed too).
    While busy, a hog holds our core half the time (``lost`` grows by half of the time
    spent) and another process uses one core's worth of CPU (``others``), unless ``hidden``
    (the OS tells neither, as on macOS: only the probes can tell). ``speed`` scales every time: the
    host running slower with nothing else running. Earlier processes calibrated the
    reference at 10 ms (``history``)."""

    def __init__(self, store, busy_pauses: int, history=(10.0,) * 4, speed: float = 1.0,
                 hidden: bool = False, jitter=(0, 1, -1, 0, 0)) -> None:
        self.clock, self.busy_pauses, self.pauses = Clock(), busy_pauses, []
        self.jitter = jitter
        self.speed, self.hidden, self.lost_ms, self.others_s = speed, hidden, 0.0, 0.0
        if history:
            store.write_text(json.dumps(list(history)))
        self.reference = Reference(store, self.reference_run, self.clock)
        self.calls = 0

    @property
    def busy(self) -> bool:
        return len(self.pauses) < self.busy_pauses

    def spend(self, ms: float) -> None:
        ms *= self.speed
        self.clock.spend(ms)
        if self.busy and not self.hidden:
            self.lost_ms += ms / 2
            self.others_s += ms / 1e3

    def reference_run(self) -> None:
        self.spend(20.0 if self.busy else 10.0)

    def call(self) -> None:
        self.calls += 1
        self.spend((100.0 if self.busy else 50.0) + self.jitter[self.calls % len(self.jitter)])

    def measure(self, max_rounds=MAX_ROUNDS):
        machine = self

        class Cpu(CpuUse):
            def snapshot(self):
                return (None if machine.hidden else machine.others_s), 0.0

        return steady_call(self.call, 5, self.reference, self.pauses.append, self.clock,
                           cpu=Cpu(), lost=lambda: self.lost_ms, max_rounds=max_rounds)


def test_a_quiet_machine_takes_one_round(tmp_path):
    stat = Machine(tmp_path / "ref.json", busy_pauses=0).measure()
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (1, 0, False)
    assert stat.median_ms == approx(50.0) and stat.reference_ratio == approx(1.0)
    assert stat.ci == approx(0.02)


def test_a_disturbed_round_is_taken_again_after_a_pause(tmp_path):
    machine = Machine(tmp_path / "ref.json", busy_pauses=2)
    stat = machine.measure()
    assert machine.pauses == list(PAUSES_S[:2])
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (3, 2, False)
    assert stat.median_ms == approx(50.0) and len(stat.samples_ms) == 5


@pytest.mark.parametrize("hidden", [False, True])
def test_a_disturbance_that_never_ends_is_recorded(tmp_path, hidden):
    machine = Machine(tmp_path / "ref.json", busy_pauses=10**6, hidden=hidden)
    stat = machine.measure()
    assert len(machine.pauses) == MAX_ROUNDS - 1
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (MAX_ROUNDS, MAX_ROUNDS, True)
    assert stat.median_ms == approx(100.0) and stat.reference_ratio == approx(2.0)
    assert stat.wait_share == approx(0.0 if hidden else 0.5)
    assert stat.reference_shift == 1.0  # a hog never moves the calibration


def test_fewer_rounds_record_the_disturbance_sooner(tmp_path):  # [evaluate] latency_rounds
    machine = Machine(tmp_path / "ref.json", busy_pauses=10**6)
    stat = machine.measure(max_rounds=2)
    assert machine.pauses == [PAUSES_S[0]]
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (2, 2, True)
    assert machine.reference.calibrated_ms == approx(10.0)


def test_clean_samples_that_never_pin_the_median_down_are_marked_at_the_last_round(tmp_path):
    # Every probe clean, nothing waits, but the calls scatter by +-20% (the machine moves
    # under them): the interval never reaches +-5%, so the measurement runs every round and
    # is marked, its latency still the clean samples' median.
    machine = Machine(tmp_path / "ref.json", busy_pauses=0, jitter=(-10, 10, 0, -7, 7, 3))
    stat = machine.measure()
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (MAX_ROUNDS, 0, True)
    assert stat.ci > TARGET_CI and stat.median_ms == approx(50.0, abs=3.0)
    assert machine.pauses == []  # no round was disturbed: nothing to wait for
    rounds, start_ms, usual_ms, cap = last_measurement()
    assert not decide(list(rounds), start_ms, 5, usual_ms).disturbed  # no cap: not judged
    assert not decide(list(rounds)[:2], start_ms, 5, usual_ms, cap).disturbed  # rounds left
    assert decide(list(rounds)[:2], start_ms, 5, usual_ms, 2).disturbed


def test_a_host_that_runs_slower_with_nothing_else_running_is_followed(tmp_path):
    # Everything 30% slower, nothing waits, no other process: the host's own speed moved.
    # The calibration follows it, and the latency (65 ms as timed) is the usual speed's.
    machine = Machine(tmp_path / "ref.json", busy_pauses=0, speed=1.3)
    stat = machine.measure()
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (1, 0, False)
    assert stat.median_ms == approx(50.0) and stat.reference_shift == approx(1.3)
    assert stat.host_slowdown == approx(1.3) and max(stat.samples_ms) < 52.0
    assert machine.reference.calibrated_ms == approx(13.0)
    assert machine.reference.usual_ms == approx(10.0)  # the history's 25th percentile


def test_the_last_measurement_can_be_judged_again(tmp_path):
    # benchmarks/steady_latency.py keeps the raw rounds and re-judges them offline.
    machine = Machine(tmp_path / "ref.json", busy_pauses=2, speed=1.3)
    stat = machine.measure()
    rounds, start_ms, usual_ms, cap = last_measurement()
    assert len(rounds) == stat.rounds == 3 and (start_ms, usual_ms) == approx((10.0, 10.0))
    assert decide(list(rounds), start_ms, 5, usual_ms, cap) == stat and cap == MAX_ROUNDS


def test_a_host_that_runs_slower_beside_a_hog_is_not_followed(tmp_path):
    # The same probes, while another process used our cores: no re-calibration.
    machine = Machine(tmp_path / "ref.json", busy_pauses=10**6, speed=0.65)
    stat = machine.measure()  # busy probes read 20 * 0.65 = 13 ms
    assert stat.disturbed and stat.reference_shift == 1.0 and stat.host_slowdown == 1.0
    assert machine.reference.calibrated_ms == approx(10.0)


def test_a_process_that_starts_under_load_calibrates_against_the_machine_history(tmp_path):
    store = tmp_path / "ref.json"
    first = Machine(store, busy_pauses=0, history=())
    assert first.reference.calibrated_ms == approx(10.0)
    others = [Machine(store, busy_pauses=0, history=()).reference for _ in range(3)]
    assert [r.calibrated_ms for r in others] == approx([10.0] * 3)
    busy = Machine(store, busy_pauses=10**6, history=())
    assert busy.reference.calibrated_ms == approx(10.0)  # the 25th percentile of 10,10,10,10,20
    assert busy.measure().disturbed
    assert json.loads(store.read_text()) == approx([10.0] * 4 + [20.0])


def test_without_the_history_only_the_run_queue_wait_notices_a_process_under_load(tmp_path):
    # The counterpart of the test above: what the stored calibrations are for where the OS
    # says nothing (macOS), and what the wait signal adds where it does.
    silent = Machine(tmp_path / "a.json", busy_pauses=10**6, history=(), hidden=True)
    assert not silent.measure().disturbed
    told = Machine(tmp_path / "b.json", busy_pauses=10**6, history=())
    assert told.measure().disturbed


def test_median_ci_uses_the_order_statistics_of_the_binomial_table():
    # n = 20: the 95% interval of the median runs from the 6th to the 15th value.
    samples = [float(v) for v in range(1, 21)]
    assert median_ci(samples) == (15.0 - 6.0) / (2 * 10.5)
    assert median_ci([100.0] * 7) == 0.0


def test_a_burst_between_probes_sets_aside_only_the_samples_beside_it():
    # Probes (ms) around five samples; the third probe ran at 1.5x: a burst that a
    # before-and-after pair of probes around the whole round would have missed.
    probes = [10.0, 10.2, 15.0, 9.9, 10.1, 10.0]
    samples = [50.0, 51.0, 80.0, 49.0, 50.0]
    rounds = [Round(tuple(Sample(ms, probes[i], probes[i + 1])
                          for i, ms in enumerate(samples)))]
    stat = decide(rounds, 10.0, runs=3)
    assert stat.samples_ms == (50.0, 49.0, 50.0)  # the two samples beside the burst are out
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (1, 1, False)
    assert stat.reference_ratio == approx(1.02)  # the kept samples' furthest probe
    assert decide(rounds, 10.0, runs=5).disturbed  # 3 clean samples are not 5


def test_with_too_few_clean_samples_the_least_disturbed_are_kept_and_marked():
    rounds = [Round((Sample(100.0, 20.0, 21.0), Sample(70.0, 13.0, 12.0),
                     Sample(60.0, 12.0, 11.5)))]
    stat = decide(rounds, 10.0, runs=2)
    assert stat.disturbed and stat.samples_ms == (60.0, 70.0)
    assert stat.reference_ratio == approx(1.3)


def test_a_sample_that_waited_for_the_cpu_is_set_aside_whatever_its_probes_say():
    # A hog's time slice fell inside the sample, between two probes that ran alone.
    samples = (Sample(50.0, 10.0, 10.1), Sample(90.0, 10.1, 9.9, wait=0.4),
               Sample(51.0, 9.9, 10.0), Sample(49.0, 10.0, 10.2, after_wait=0.3),
               Sample(50.0, 10.2, 10.0))
    stat = decide([Round(samples)], 10.0, runs=3)
    assert stat.samples_ms == (50.0, 51.0, 50.0) and not stat.disturbed
    assert stat.disturbed_rounds == 1 and stat.wait_share == 0.0


def _round_at(probe_ms: float, others: float | None, wait: float = 0.0) -> Round:
    return Round(tuple(Sample(65.0 + i, probe_ms, probe_ms * (1 + 0.01 * i), wait=wait)
                       for i in range(5)), others)


def test_only_a_round_with_the_cores_to_itself_recalibrates():
    # Probes 30% over the calibration, agreeing with each other: the host slowed down,
    # unless another process held our cores or the samples waited for the CPU.
    assert _round_at(13.0, others=0.0).settled() == approx(13.0)
    assert _round_at(13.0, others=1.0).settled() is None      # a hog on another core
    assert _round_at(13.0, others=None).settled() is None     # unknown (macOS)
    assert _round_at(13.0, others=0.0, wait=0.3).settled() is None  # a hog on our core
    burst = Round((Sample(65.0, 20.0, 13.0),) + _round_at(13.0, 0.0).samples[1:], 0.0)
    assert burst.settled() is None  # the probes disagree
    quiet = decide([_round_at(13.0, others=0.0)], 10.0, runs=5)
    assert not quiet.disturbed and quiet.reference_shift == approx(1.3)
    assert decide([_round_at(13.0, others=1.0)], 10.0, runs=5).disturbed


def test_a_recalibration_carries_to_the_rounds_after_it_but_not_before():
    rounds = [_round_at(13.0, others=1.0), _round_at(13.0, others=0.0),
              _round_at(13.2, others=1.0)]
    stat = decide(rounds, 10.0, runs=5)
    assert stat.disturbed_rounds == 1 and len(stat.samples_ms) == 10


def test_other_processes_cpu_is_the_cores_busy_time_less_our_own():
    # 0.5 s of wall time: the cores were busy 0.9 s, 0.4 s of it ours.
    assert CpuUse.others((10.0, 1.0), (10.9, 1.4), 0.5) == approx(1.0)
    assert CpuUse.others((None, 1.0), (10.9, 1.4), 0.5) is None
    assert CpuUse.others((10.0, 1.0), (10.1, 1.4), 0.5) == 0.0  # tick rounding never < 0


def test_a_probe_faster_than_the_calibration_is_disturbance_too():
    # A VM whose other core is busy runs faster (benchmarks/measurement.md): not the usual time.
    assert not Sample(50.0, 7.0, 10.0).clean(10.0)
    assert Sample(50.0, 9.5, 10.8).clean(10.0)


def test_quieter_measurements_correct_a_calibration_taken_under_load(tmp_path):
    store = tmp_path / "ref.json"
    store.write_text(json.dumps([30.0]))  # the first process calibrated beside a hog
    ref = Reference(store, workload=lambda: None)
    ref._remember(31.0)
    for _ in range(6):
        ref.learn(_round_at(10.0, others=1.0))  # busy elsewhere, but our probes ran alone
    assert ref.usual_ms < 11.0 and ref.calibrated_ms == ref.usual_ms
    for _ in range(40):  # a hog that never ends is never learnt as the usual time
        ref.learn(_round_at(25.0, others=1.0))
        ref.learn(_round_at(13.0, others=0.0, wait=0.3))
    assert ref.usual_ms < 11.0 and ref.calibrated_ms == ref.usual_ms
    ref.learn(_round_at(13.0, others=0.0))  # a settled round: the host's speed now
    assert ref.calibrated_ms == approx(13.0) and ref.usual_ms < 11.0


def test_a_short_call_is_timed_over_a_window_of_back_to_back_runs():
    clock = Clock()
    calls = []

    def call():
        calls.append(1)
        clock.spend(4.0)

    assert window_ms(call, clock) == approx(4.0)
    assert len(calls) == -(-MIN_WINDOW_MS // 4.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_while_timing_no_gc_runs_and_every_thread_stays_on_one_core():
    before = os.sched_getaffinity(0)
    seen = []
    with held_still(pin=True):
        seen.append((gc.isenabled(), [os.sched_getaffinity(int(t))
                                      for t in os.listdir("/proc/self/task")]))
    enabled, masks = seen[0]
    assert not enabled and gc.isenabled()
    assert len({frozenset(m) for m in masks}) == 1 and len(masks[0]) == 1
    assert os.sched_getaffinity(0) == before


def test_pinned_openblas_runs_one_thread_and_gets_its_threads_back():
    """Pinned to one core, a second BLAS thread would only take turns with the first."""
    import ctypes

    lib = ctypes.CDLL(None)
    if not hasattr(lib, "openblas_get_num_threads"):
        pytest.skip("no OpenBLAS bound in this process")
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(2)
    try:
        with held_still(pin=True) as pinned:
            inside = lib.openblas_get_num_threads()
        assert pinned and inside == 1
        assert lib.openblas_get_num_threads() == 2
        with held_still(pin=False):
            assert lib.openblas_get_num_threads() == 2
    finally:
        lib.openblas_set_num_threads(before)


HOG = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_cpu_hog_on_the_measuring_core_is_noticed(tmp_path):
    """Two real processes spinning on the core the measurement is pinned to: samples are set
    aside (assert on the protocol's structure, never on milliseconds)."""
    a = mx.random.normal((96, 96))
    reference = Reference(tmp_path / "ref.json")
    mine = os.sched_getaffinity(0)
    core = min(mine)
    os.sched_setaffinity(0, {core})
    try:
        reference.calibrated_ms  # noqa: B018 (calibrated before the hogs start)
        hogs = [subprocess.Popen([sys.executable, "-c", HOG, str(core)]) for _ in range(2)]
        try:
            time.sleep(0.2)
            stat = steady_call(lambda: mx.eval(a @ a), 5, reference, pause=lambda s: None)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    finally:
        os.sched_setaffinity(0, mine)
    assert stat.disturbed_rounds >= 1 and stat.rounds > 1
    assert stat.wait_share > WAIT_TOLERANCE  # the hogs took the core: wall ran past CPU time
    assert stat.reference_shift == 1.0  # and never moved the calibration


def _burn_then_sleep(burn_ms: float, sleep_ms: float) -> None:
    """``burn_ms`` of this process's CPU time, then ``sleep_ms`` off the core."""
    start = time.process_time()
    while (time.process_time() - start) * 1e3 < burn_ms:
        pass
    time.sleep(sleep_ms / 1e3)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinned_on_the_cpu_a_sample_is_the_time_the_core_ran_it(tmp_path):
    """Pinned on the CPU backend, the protocol times on the process's CPU time: time the
    process spends off its core (here asleep; beside a hog, the hog's time slices) is not
    the model's. Unpinned, it times the wall clock, sleep included."""
    reference = Reference(tmp_path / "ref.json")
    call = lambda: _burn_then_sleep(3.0, 3.0)  # noqa: E731
    timed = []  # as timed: before the scaling to the host's usual speed
    for pin in (True, False):
        steady_call(call, 5, reference, pause=lambda s: None, pin=pin, max_rounds=1)
        timed.append(sorted(s.ms for r in last_measurement()[0] for s in r.samples)[2])
    assert 3.0 <= timed[0] < 4.5  # the 3 ms asleep are not counted
    assert timed[1] >= 6.0


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux only")
def test_the_contention_signals_are_read_from_the_kernel():
    waited = run_queue_wait_ms()
    busy, own = CpuUse().snapshot()
    a = mx.random.normal((256, 256))
    for _ in range(20):
        mx.eval(a @ a)
    assert run_queue_wait_ms() >= waited >= 0.0
    later, own_later = CpuUse().snapshot()
    assert busy is not None and later >= busy and own_later > own
