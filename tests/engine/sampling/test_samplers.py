"""Samplers against an oracle: Gaussian data, whose optimal denoiser is closed-form."""

import mlx.core as mx
import numpy as np
import pytest

from engine.config import ScheduleConfig
from engine.sampling.samplers import SAMPLERS, get_sampler
from engine.sampling.schedules import alpha_sigma, grid

MU, STD = 0.7, 0.3  # per-pixel data distribution N(MU, STD^2)


def gaussian_denoiser(kind):
    """E[x0 | x_t] for x0 ~ N(MU, STD^2): Tweedie's formula in closed form."""

    def denoise(x, t):
        a, s = (float(v) for v in alpha_sigma(t, kind))
        gain = a * STD**2 / (a**2 * STD**2 + s**2)
        x0 = MU + gain * (x - a * MU)
        return x0, (x - a * x0) / s

    return denoise


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_sampler_reproduces_gaussian(name, kind):
    # Ancestral sampling converges more slowly in the step count than the ODE solvers.
    steps = 250 if name == "ddpm" else 60
    cfg = ScheduleConfig(beta_schedule=kind, sampler=name, steps=steps, spacing="trailing")
    x = mx.random.normal((4096, 2, 2, 1), key=mx.random.key(1))
    out = np.array(get_sampler(name)(gaussian_denoiser(kind), x, grid(cfg), mx.random.key(2), 0.0))
    assert abs(out.mean() - MU) < 0.03
    assert abs(out.std() / STD - 1) < 0.08


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "karras", "trailing"])
def test_spacings_end_at_zero_and_descend(spacing):
    g = grid(ScheduleConfig(steps=10, spacing=spacing))
    assert g.t[-1] == 0.0 and len(g.t) == 11
    assert np.all(np.diff(g.t) < 0)
    assert np.all(g.alpha**2 + g.sigma**2 == pytest.approx(1.0))


def test_explicit_timesteps_are_used():
    ts = (0.9, 0.5, 0.1)
    g = grid(ScheduleConfig(steps=3, spacing="explicit", timesteps=ts))
    assert list(g.t) == [0.9, 0.5, 0.1, 0.0]


def test_stochastic_sampler_depends_on_key_only():
    cfg = ScheduleConfig(sampler="ddpm", steps=8)
    x = mx.zeros((8, 2, 2, 1))
    run = lambda k: np.array(SAMPLERS["ddpm"](gaussian_denoiser("cosine"), x, grid(cfg), mx.random.key(k), 1.0))
    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_unknown_sampler_named():
    with pytest.raises(ValueError, match="heun"):
        get_sampler("heun")


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_training_schedule_matches_sampling_schedule(kind):
    """The MLX schedule used in the loss must agree with the numpy one the samplers use."""
    from engine.sampling.diffusion import alpha_sigma_mx

    t = np.linspace(0.0, 1.0, 21)
    alpha, sigma = alpha_sigma_mx(mx.array(t.astype(np.float32)), kind)
    want_alpha, want_sigma = alpha_sigma(t, kind)
    assert np.allclose(np.array(alpha), want_alpha, atol=1e-5)
    assert np.allclose(np.array(sigma), want_sigma, atol=1e-3)
