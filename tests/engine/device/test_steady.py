"""The steady latency protocol (engine.device.bench.steady_call) on a scripted clock: a
reference workload that runs slow while the machine is 'disturbed' must make the round be
taken again after a pause, and a disturbance that never ends must be recorded as such."""

import json

from pytest import approx

from engine.device.bench import MAX_ROUNDS, PAUSES_S, Reference, median_ci, steady_call


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
    Earlier processes calibrated the reference at 10 ms (``history``)."""

    def __init__(self, store, busy_pauses: int, history=(10.0,) * 4) -> None:
        self.clock, self.busy_pauses, self.pauses = Clock(), busy_pauses, []
        if history:
            store.write_text(json.dumps(list(history)))
        self.reference = Reference(store, self.reference_run, self.clock)
        self.calls = 0

    @property
    def busy(self) -> bool:
        return len(self.pauses) < self.busy_pauses

    def reference_run(self) -> None:
        self.clock.spend(20.0 if self.busy else 10.0)

    def call(self) -> None:
        self.calls += 1
        self.clock.spend((100.0 if self.busy else 50.0) + (0, 1, -1, 0, 0)[self.calls % 5])

    def measure(self):
        return steady_call(self.call, 5, self.reference, self.pauses.append, self.clock)


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


def test_a_disturbance_that_never_ends_is_recorded(tmp_path):
    machine = Machine(tmp_path / "ref.json", busy_pauses=10**6)
    stat = machine.measure()
    assert len(machine.pauses) == MAX_ROUNDS - 1
    assert (stat.rounds, stat.disturbed_rounds, stat.disturbed) == (MAX_ROUNDS, MAX_ROUNDS, True)
    assert stat.median_ms == approx(100.0) and stat.reference_ratio == approx(2.0)


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


def test_without_the_history_a_process_under_load_would_not_notice(tmp_path):
    # The counterpart of the test above: what the stored calibrations are for.
    busy = Machine(tmp_path / "ref.json", busy_pauses=10**6, history=())
    assert not busy.measure().disturbed


def test_median_ci_uses_the_order_statistics_of_the_binomial_table():
    # n = 20: the 95% interval of the median runs from the 6th to the 15th value.
    samples = [float(v) for v in range(1, 21)]
    assert median_ci(samples) == (15.0 - 6.0) / (2 * 10.5)
    assert median_ci([100.0] * 7) == 0.0
