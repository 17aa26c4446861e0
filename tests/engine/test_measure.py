"""The measurement protocol on a real (untrained) U-Net: the samples it scores, the quality
record and grid, latency and memory, and the step budget fitted to a latency target."""

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from engine.config import Config
from engine.data.datasets import load_dataset
from engine.device import steady
from engine.device.bench import LatencyStat, forward_latency
from engine.measure import (
    LatencyTargetInfeasible,
    MemoryResult,
    evaluate,
    fit_step_budget,
    measure,
    measure_cost,
    sample_images,
    side_by_side,
)
from engine.model.unet import UNet
from engine.quality.features import digits_feature_network
from engine.quality.metrics import evaluate_quality
from engine.sampling.samplers import generate

TINY = Config.load("engine/configs/tiny.json")
CONFIG = replace(TINY, schedule=replace(TINY.schedule, steps=2))


@pytest.fixture(scope="module")
def model() -> UNet:
    mx.random.seed(0)
    net = UNet(CONFIG.unet)
    mx.eval(net.parameters())
    return net


def test_samples_are_drawn_in_batches_seeded_by_their_offset(model):
    u = CONFIG.unet
    expected = np.concatenate([np.array(generate(model, CONFIG.schedule, size, seed,
                                                 u.image_size, u.channels))
                               for size, seed in ((2, 3), (2, 5), (1, 7))])
    got = sample_images(model, CONFIG, 5, 3, batch=2)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, sample_images(model, CONFIG, 5, 4, batch=2))


def test_evaluate_scores_the_seeded_samples_and_keeps_the_first_for_the_grid(model):
    real = load_dataset(None, image_size=8).images
    net = digits_feature_network()
    result = evaluate(model, CONFIG, real, net, n=16, seed=1, grid=4)
    fake = sample_images(model, CONFIG, 16, 1)
    assert result.record == evaluate_quality(fake, real, net, 16, 1)
    np.testing.assert_array_equal(result.grid, fake[:4])
    assert result.to_dict()["n"] == 16 and result.to_dict()["fid"] == result.record.fid


def test_measure_composes_quality_latency_and_memory(model):
    real = load_dataset(None, image_size=8).images
    measured = measure(model, CONFIG, real, digits_feature_network(), n=16, seed=1)
    assert measured.quality.record == evaluate(model, CONFIG, real, digits_feature_network(),
                                               16, 1).record
    latency = measured.cost.latency
    assert len(latency.samples_ms) >= 5 and latency.median_ms == np.median(latency.samples_ms)
    assert measured.cost.memory.train_mb > 0 and measured.cost.memory.sample_mb > 0


def test_a_latency_already_measured_is_not_measured_again(model):
    known = LatencyStat(123.0, 0.0, (123.0,) * 5)
    cost = measure_cost(model, CONFIG, latency=known)
    assert cost.latency is known and cost.seconds >= 0


def test_side_by_side_takes_at_most_the_study_s_rounds_per_measurement(model, monkeypatch):
    # A derived point's latency (search.derived.points) honours [evaluate] latency_rounds,
    # as a trial's does. With a confidence target no median meets, the protocol would take
    # every round it may: 2 here, not the default 6.
    monkeypatch.setattr(steady, "TARGET_CI", -1.0)
    here, there = side_by_side(model, CONFIG, model, CONFIG, runs=5, rounds=1, max_rounds=2)
    assert 0 < here < math.inf and 0 < there < math.inf
    assert len(steady.last_measurement()[0]) == 2


def test_memory_objective_picks_sample_train_or_the_larger():
    memory = MemoryResult(train_mb=30.0, sample_mb=12.0)
    assert [memory.objective(w) for w in ("sample", "train", "max")] == [12.0, 30.0, 30.0]
    with pytest.raises(KeyError):
        memory.objective("peak")


def test_step_budget_fits_the_most_steps_the_measured_costs_allow(model):
    target = 20 * forward_latency(model, CONFIG).median_ms
    fit = fit_step_budget(model, CONFIG, target)
    last = fit.rounds[-1]
    assert last.steps == math.floor((target - fit.overhead_ms) / last.per_step_ms) >= 1
    assert (fit.config.schedule.sampler, fit.config.schedule.steps) == (last.sampler, last.steps)
    assert fit.latency.median_ms == last.measured_ms
    assert len(fit.rounds) == 1 or fit.rounds[-2].measured_ms > target
    record = fit.to_dict()
    assert record["steps"] == last.steps and record["target_ms"] == target
    assert record["schedule"]["steps"] == last.steps and record["reason"] == fit.reason
    assert record["rounds"][-1]["measured_ms"] == last.measured_ms


def test_a_target_below_one_evaluation_is_infeasible(model):
    with pytest.raises(LatencyTargetInfeasible, match="below one network evaluation") as err:
        fit_step_budget(model, CONFIG, 1e-3)
    assert err.value.floor_ms > 0
