"""The worker's measurement carries the steady protocol's trust fields, a disturbed
latency measured again keeps both attempts, and memory is measured while other processes
compute (real MLX, a tiny model, real processes on the device lock)."""

import subprocess
import sys
import time
from dataclasses import replace

import pytest

from engine.config import Config
from engine.device.bench import LatencyStat
from engine.model.unet import UNet
from workers.clock import PhaseClock
from workers.device_lock import DeviceLock, DeviceLockTimeout
from workers.measuring import latency as _latency
from workers.measuring import measure as _measure
from workers.measuring import remeasure as _remeasure
from workers.records import LATENCY_TRUST

CONFIG = Config.from_dict({"unet": {"image_size": 8, "base_width": 8, "width_mults": [1, 2],
                                    "norm_groups": 4, "time_emb_dim": 32},
                           "schedule": {"sampler": "ddim", "steps": 2},
                           "train": {"steps": 10, "batch_size": 8}})


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = UNet(CONFIG.unet)
    clock = PhaseClock(DeviceLock(tmp_path_factory.mktemp("locks")))
    return model, _measure(model, CONFIG, _latency(model, CONFIG, 5, None), None,
                           {"status": "fresh"}, clock)


def test_the_measurement_says_how_far_its_latency_can_be_trusted(measured):
    _, m = measured
    assert m.latency_rounds >= 1 and 0 <= m.disturbed_rounds <= m.latency_rounds
    assert len(m.latency_samples_ms) >= 5 and m.latency_ci >= 0 and m.reference_ratio > 0
    assert m.latency_attempts == ()


def test_a_disturbed_latency_measured_again_keeps_both_attempts(measured):
    model, m = measured
    # What the protocol records beside a CPU hog: no clean sample, the reference at 2.5x.
    first = replace(m, latency_ms=m.latency_ms * 3, disturbed=True, reference_ratio=2.5,
                    disturbed_rounds=m.latency_rounds)
    final = _remeasure(model, CONFIG, 5, first)
    before, after = final.latency_attempts
    assert (before["at"], after["at"]) == ("before training", "after evaluation")
    assert {k: before[k] for k in LATENCY_TRUST} == {k: getattr(first, k) for k in LATENCY_TRUST}
    assert set(after) == set(before) and after["seconds"] > 0
    kept = after if not after["disturbed"] or after["reference_ratio"] <= 2.5 else before
    assert {k: getattr(final, k) for k in LATENCY_TRUST} == {k: kept[k] for k in LATENCY_TRUST}
    assert final.train_mb == m.train_mb and final.start == m.start


COMPUTING = """
import sys, time
from pathlib import Path
from workers.device_lock import DeviceLock, DeviceLockTimeout

with DeviceLock(sys.argv[1]).shared():
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def test_memory_is_measured_while_another_process_computes(tmp_path, measured):
    model, m = measured
    folder, held = tmp_path / "locks", tmp_path / "held"
    other = subprocess.Popen([sys.executable, "-c", COMPUTING, str(folder), str(held)])
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.01)
        with pytest.raises(DeviceLockTimeout), DeviceLock(folder, timeout_s=0.3).exclusive():
            pass  # the other process does hold the device
        clock = PhaseClock(DeviceLock(folder, timeout_s=30))
        again = _measure(model, CONFIG, (_stat(m), m.seconds), None, m.start, clock)
    finally:
        other.kill()
        other.wait()
    assert again.train_mb > 0 and again.sample_mb > 0
    assert again.latency_ms == m.latency_ms and again.seconds > m.seconds
    assert clock.seconds["latency"] > 0


def _stat(m):
    return LatencyStat(m.latency_ms, m.latency_spread, m.latency_samples_ms, m.latency_ci,
                       m.latency_rounds, m.disturbed_rounds, m.reference_ratio, m.disturbed)
