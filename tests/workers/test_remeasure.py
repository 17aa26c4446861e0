"""The worker's measurement carries the steady protocol's trust fields, and a disturbed
latency measured again keeps both attempts (real MLX, a tiny model)."""

from dataclasses import replace

import pytest

from engine.config import Config
from engine.model.unet import UNet
from workers.records import LATENCY_TRUST
from workers.trial import _measure, _remeasure

CONFIG = Config.from_dict({"unet": {"image_size": 8, "base_width": 8, "width_mults": [1, 2],
                                    "norm_groups": 4, "time_emb_dim": 32},
                           "schedule": {"sampler": "ddim", "steps": 2},
                           "train": {"steps": 10, "batch_size": 8}})


@pytest.fixture(scope="module")
def measured():
    model = UNet(CONFIG.unet)
    return model, _measure(model, CONFIG, 5, None, {"status": "fresh"})


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
