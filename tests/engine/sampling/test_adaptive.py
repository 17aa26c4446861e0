"""Optimised schedules, the adaptive sampler and the step budget, on oracles."""

import mlx.core as mx
import numpy as np
import pytest

from engine.config import Config, ScheduleConfig, UNetConfig
from engine.device.bench import forward_latency
from engine.model.unet import UNet
from engine.sampling.adaptive import StepBudget, choose_budget, sample_adaptive, with_budget
from engine.sampling.samplers import generate
from engine.sampling.schedules import alpha_sigma, trailing_times, uniform_times
from engine.sampling.timesteps import (
    logits_from_times,
    optimize_times,
    sampling_error,
    times_from_logits,
)

MU, STD, KIND = 0.4, 0.5, "cosine"


def gaussian_denoiser(x, t):
    a, s = (float(v) for v in alpha_sigma(t, KIND))
    x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
    return x0, (x - a * x0) / s


def exact_solution(noise):
    """The probability-flow ODE maps N(0, I) at t = 1 to the data quantile by quantile."""
    a, s = (float(v) for v in alpha_sigma(1.0, KIND))
    return MU + STD * (noise - a * MU) / np.sqrt(a**2 * STD**2 + s**2)


class GaussianNet:
    """The oracle as a network with per-sample times, predicting eps."""

    def __call__(self, x, t):
        a, s = alpha_sigma(np.array(t), KIND)
        a, s = (mx.array(v.astype(np.float32))[:, None, None, None] for v in (a, s))
        x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
        return (x - a * x0) / s


def test_logits_round_trip():
    ts = trailing_times(6)
    assert np.allclose(times_from_logits(logits_from_times(ts, KIND), KIND), ts, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_optimized_schedule_beats_uniform_against_exact_solution(sampler):
    noise = mx.random.normal((256, 2, 2, 1), key=mx.random.key(0))
    exact = mx.array(exact_solution(np.array(noise)))
    err = lambda ts: sampling_error(gaussian_denoiser, noise, exact, ts, KIND, sampler)
    result = optimize_times(err, 4, KIND, seed=0, max_evals=150)
    assert result.error < err(uniform_times(4))
    assert result.error < result.baseline_error
    assert len(result.times) == 4 and all(np.diff(result.times) < 0)


def test_adaptive_sampler_spends_less_on_easy_inputs_and_respects_cap():
    easy = 0.05 * mx.random.normal((8, 4, 4, 1), key=mx.random.key(1))
    hard = 3.0 * mx.random.normal((8, 4, 4, 1), key=mx.random.key(2))
    result = sample_adaptive(GaussianNet(), mx.concatenate([easy, hard]), "eps", KIND,
                             atol=0.02, rtol=0.0, max_nfe=80)
    assert result.nfe[:8].mean() < result.nfe[8:].mean()
    assert result.nfe.max() <= 80
    out = np.array(result.samples)
    assert np.allclose(out, exact_solution(np.array(mx.concatenate([easy, hard]))), atol=0.05)


def test_adaptive_sampler_cap_is_hard():
    noise = mx.random.normal((4, 4, 4, 1), key=mx.random.key(3))
    result = sample_adaptive(GaussianNet(), noise, "eps", KIND, atol=1e-6, rtol=0.0, max_nfe=9)
    assert result.nfe.max() <= 9


def test_budget_fits_measured_latency():
    cfg = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, time_emb_dim=16))
    model = UNet(cfg.unet)
    per_eval = forward_latency(model, cfg).median_ms
    target = 25 * per_eval
    budget = choose_budget(target, per_eval)
    assert budget.predicted_ms <= target
    assert budget.steps == 25 and budget.sampler == "dpmpp_2m"
    with pytest.raises(ValueError, match="below one network evaluation"):
        choose_budget(0.5 * per_eval, per_eval)


# -- the adaptive sampler by name, through ScheduleConfig and engine.sampling.samplers.generate --


@pytest.mark.parametrize("steps, sampler", [(3, "adaptive"), (9, "adaptive"), (2, "ddim")])
def test_a_budget_keeps_the_adaptive_sampler_when_three_steps_fit(steps, sampler):
    schedule = ScheduleConfig(sampler="adaptive", steps=3, spacing="optimized",
                              timesteps=(0.9, 0.5, 0.1), tolerance=0.05)
    kept = with_budget(schedule, StepBudget("ddim", steps, 1.0, 2.0))
    # the steps cap the adaptive sampler's evaluations; stored times become trailing
    assert (kept.sampler, kept.steps, kept.spacing, kept.timesteps) == (
        sampler, steps, "trailing", ())
    assert kept.tolerance == 0.05


def test_generate_with_the_adaptive_sampler_solves_the_gaussian_ode():
    schedule = ScheduleConfig(sampler="adaptive", steps=200, tolerance=1e-3, beta_schedule=KIND)
    out = np.array(generate(GaussianNet(), schedule, 8, seed=3, image_size=4, channels=1,
                            clip_x0=False))
    k_noise, _ = mx.random.split(mx.random.key(3))  # the noise generate draws
    noise = np.array(mx.random.normal((8, 4, 4, 1), key=k_noise))
    assert np.allclose(out, exact_solution(noise), atol=0.01)
    clipped = np.array(generate(GaussianNet(), schedule, 8, 3, 4, 1))
    assert clipped.max() <= 1.0 and np.allclose(clipped, np.clip(out, -1, 1), atol=1e-5)


def test_a_loose_tolerance_is_a_different_and_coarser_solution():
    tight = ScheduleConfig(sampler="adaptive", steps=200, tolerance=1e-3, beta_schedule=KIND)
    loose = ScheduleConfig(sampler="adaptive", steps=200, tolerance=0.5, beta_schedule=KIND)
    k_noise, _ = mx.random.split(mx.random.key(0))
    exact = exact_solution(np.array(mx.random.normal((8, 4, 4, 1), key=k_noise)))
    errors = [np.abs(np.array(generate(GaussianNet(), s, 8, 0, 4, 1, clip_x0=False)) - exact)
              .mean() for s in (tight, loose)]
    assert errors[0] < errors[1]


def test_adaptive_settings_are_validated_and_round_trip():
    with pytest.raises(ValueError, match=r"ScheduleConfig.steps=2: must be >= 3 for the adaptive"):
        ScheduleConfig(sampler="adaptive", steps=2)
    with pytest.raises(ValueError, match=r"ScheduleConfig.tolerance=0.0: must be > 0"):
        ScheduleConfig(tolerance=0.0)
    config = Config(schedule=ScheduleConfig(sampler="adaptive", steps=8, tolerance=0.05))
    assert Config.from_json(config.to_json()) == config
    old = config.to_dict()
    del old["schedule"]["tolerance"]  # a config written before the field existed
    assert Config.from_dict(old).schedule.tolerance == 0.02
