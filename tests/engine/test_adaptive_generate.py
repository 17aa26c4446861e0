"""The adaptive sampler chosen by name through ScheduleConfig and ``engine.samplers.generate``."""

import mlx.core as mx
import numpy as np
import pytest

from engine.config import Config, ScheduleConfig
from engine.samplers import generate
from engine.schedules import alpha_sigma

MU, STD, KIND = 0.4, 0.5, "cosine"


class GaussianNet:
    """The optimal eps-predictor for data N(MU, STD^2), with per-sample times."""

    def __call__(self, x, t):
        a, s = alpha_sigma(np.array(t), KIND)
        a, s = (mx.array(v.astype(np.float32))[:, None, None, None] for v in (a, s))
        x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
        return (x - a * x0) / s


def exact_solution(noise):
    """The probability-flow ODE maps N(0, I) at t = 1 to the data quantile by quantile."""
    a, s = (float(v) for v in alpha_sigma(1.0, KIND))
    return MU + STD * (noise - a * MU) / np.sqrt(a**2 * STD**2 + s**2)


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
