"""Distillation: progressive (Salimans & Ho 2022) and consistency (Song et al. 2023), gated."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.data.datasets import load_dataset
from engine.io.checkpoint import load_checkpoint, load_weights, save_checkpoint
from engine.io.models import load_distilled
from engine.model.unet import UNet
from engine.sampling.diffusion import alpha_sigma_mx, denoiser, to_x0_eps
from engine.sampling.samplers import generate, sample_ddim, sample_ddpm
from engine.sampling.schedules import Grid, alpha_sigma, grid
from engine.sampling.substeps import base_schedule, grid_arrays, sub_schedule
from engine.training.consistency import (
    ConsistencyConfig,
    ConsistencyModel,
    consistency_distill,
    discretisation,
    sample_consistency,
)
from engine.training.distill import distill
from engine.training.losses import EPS, c_skip_c_out, consistency_function, consistency_loss
from engine.training.progressive import ProgressiveConfig, progressive_distill
from engine.training.quality_gate import fid_quality, sample_error_quality
from engine.training.stages import Gate
from engine.training.student import reparametrise
from engine.training.train import init_state, train

TINY = Config(
    unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2),
                    time_emb_dim=16, activation="relu"),
    schedule=ScheduleConfig(prediction="v"),
    train=TrainConfig(steps=200, batch_size=32, learning_rate=3e-3, warmup_steps=20,
                      ema_decay=0.98, eval_every=200))
OPEN_GATE = Gate(max_fid_ratio=1e6, max_retries=0)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.array(load_dataset(None, image_size=8).images[:1000])


@pytest.fixture(scope="module")
def teacher(digits):
    state = train(init_state(TINY), digits, digits[:64])
    model = state.ema_model()
    model.eval()
    return model


@pytest.fixture(scope="module")
def proxy(teacher):
    """Error against the teacher's 16-step DDIM samples from the same noise."""
    reference = np.array(generate(teacher, base_schedule(TINY, 16), 32, 7, 8, 1))
    return sample_error_quality(reference, seed=7)


def _weights(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _ddim_from(model, prediction, z, ts):
    """The real sampler's DDIM from ts[0] through ts[1:] (an independent oracle for the loss)."""
    alpha, sigma = alpha_sigma(np.asarray(ts), TINY.schedule.beta_schedule)
    g = Grid(np.asarray(ts), alpha, sigma)
    return sample_ddim(denoiser(model, prediction, TINY.schedule.beta_schedule), z, g,
                       mx.random.key(0))


def test_student_one_step_matches_two_teacher_steps_better_after_a_stage(teacher, digits, proxy,
                                                                           tmp_path):
    settings = ProgressiveConfig(teacher_steps=4, target_steps=2, train_steps=80, batch_size=32,
                                 learning_rate=5e-4)
    result = progressive_distill(teacher, TINY, digits, tmp_path, proxy, settings, OPEN_GATE,
                                 measure_latency=False, emit=quiet)
    assert result.final_stage == 1 and result.schedule.steps == 2
    x0 = mx.array(digits[-64:])
    gaps = {"init": [], "trained": []}
    for t, t_mid, t_end in [(1.0, 0.75, 0.5), (0.5, 0.25, 0.0)]:
        a, s = alpha_sigma(t, "cosine")
        z = float(a) * x0 + float(s) * mx.random.normal(x0.shape, key=mx.random.key(3))
        two = _ddim_from(teacher, "v", z, [t, t_mid, t_end])
        for name, student in (("init", teacher), ("trained", result.model)):
            one = _ddim_from(student, "v", z, [t, t_end])
            gaps[name].append(float(mx.mean((one - two) ** 2)))
    assert sum(gaps["trained"]) < 0.7 * sum(gaps["init"]), gaps


def test_broken_stage_fails_gate_and_rolls_back_bit_identical(teacher, digits, proxy, tmp_path):
    settings = ProgressiveConfig(teacher_steps=4, target_steps=1, train_steps=30, batch_size=16,
                                 learning_rate=5e-4, stage_learning_rates=(5e-4, 1e4))
    gate = Gate(max_fid_ratio=10.0, max_retries=1)
    result = progressive_distill(teacher, TINY, digits, tmp_path, proxy, settings, gate,
                                 measure_latency=False, emit=quiet)
    table = [(r.stage, r.attempt, r.passed) for r in result.stages]
    assert table == [(0, 0, True), (1, 0, True), (2, 0, False), (2, 1, False)]
    retry = result.stages[3]
    assert (retry.train_steps, retry.learning_rate) == (60, 5e3)
    assert result.rolled_back and result.final_stage == 1 and result.schedule.steps == 2
    passing = result.stages[1]
    assert str(result.checkpoint) == passing.checkpoint
    _, saved = load_weights(passing.checkpoint)
    ours, theirs = _weights(result.model), _weights(saved)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert load_checkpoint(result.checkpoint).step == 30


def test_gate_retries_with_more_steps_and_lower_lr(teacher, digits, tmp_path):
    scores = iter([1.0, 5.0, 1.05])  # teacher, failing first attempt, passing retry

    def quality(model, schedule):
        return {"fid": next(scores), "kid": 0.01}

    settings = ProgressiveConfig(teacher_steps=2, target_steps=1, train_steps=5, batch_size=8,
                                 learning_rate=1e-4)
    result = progressive_distill(teacher, TINY, digits, tmp_path, quality, settings,
                                 Gate(max_fid_ratio=1.1, max_retries=2), emit=quiet)
    assert [(r.stage, r.attempt, r.passed) for r in result.stages] == [
        (0, 0, True), (1, 0, False), (1, 1, True)]
    assert [(r.train_steps, r.learning_rate) for r in result.stages[1:]] == [(5, 1e-4), (10, 5e-5)]
    assert not result.rolled_back and result.final.kid == 0.01
    assert all(r.latency_ms > 0 for r in result.stages)


def test_student_schedule_halves_the_teacher_grid():
    base = base_schedule(TINY, 64)
    half = sub_schedule(base, 8, "v")
    assert (half.spacing, half.steps, half.prediction) == ("trailing", 8, "v")
    assert np.allclose(grid(half).t, grid(base).t[::8])
    leading = sub_schedule(replace(base, spacing="uniform"), 4, "v")
    assert leading.spacing == "explicit"
    assert np.allclose(grid(leading).t, grid(replace(base, spacing="uniform")).t[::16])


def test_consistency_boundary_condition_is_exact():
    model = UNet(TINY.unet)
    x = mx.random.normal((4, 8, 8, 1), key=mx.random.key(1))
    t = mx.full((4,), EPS)
    c_skip, c_out = c_skip_c_out(t, "cosine")
    assert np.all(np.array(c_skip) == 1.0) and np.all(np.array(c_out) == 0.0)
    for prediction in ("eps", "v", "x0"):
        assert np.array_equal(np.array(consistency_function(model, x, t, prediction, "cosine")),
                              np.array(x))
    c_skip, c_out = c_skip_c_out(mx.array([0.01, 0.5, 1.0]), "cosine")
    assert np.all(np.diff(np.array(c_skip)) < 0) and np.all(np.diff(np.array(c_out)) > 0)
    assert float(c_out[-1]) > 0.99


def test_consistency_sampler_equals_ddpm_for_two_steps():
    model = ConsistencyModel(UNet(TINY.unet), "v", "cosine")
    denoise = denoiser(model, "x0", "cosine")
    g = grid(ScheduleConfig(prediction="x0", sampler="ddpm", steps=2))
    x = mx.random.normal((4, 8, 8, 1), key=mx.random.key(2))
    ours = sample_consistency(denoise, x, g, mx.random.key(5))
    ddpm = sample_ddpm(denoise, x, g, mx.random.key(5))
    assert float(mx.max(mx.abs(ours - ddpm))) < 1e-2


def test_consistency_loss_decreases_and_checkpoint_samples_the_same(teacher, digits, proxy,
                                                                    tmp_path):
    settings = ConsistencyConfig(teacher_steps=4, target_steps=1, num_scales=12, train_steps=90,
                                 batch_size=32, learning_rate=3e-4)
    result = consistency_distill(teacher, TINY, digits, tmp_path, proxy, settings, OPEN_GATE,
                                 measure_latency=False, emit=quiet)
    assert result.final_stage == 1 and isinstance(result.model, ConsistencyModel)
    g = grid_arrays(discretisation(settings, "cosine"), "cosine")
    x0 = mx.array(digits[-64:])

    def loss(online, target):
        return np.mean([float(consistency_loss(online, target, teacher, x0, mx.random.key(k), g,
                                               "v", "v", "cosine")) for k in range(4)])

    before = loss(teacher, teacher)
    after = loss(result.state.model, result.model.unet)
    assert after < 0.7 * before, (before, after)
    first_step = result.stages[1]
    assert first_step.fid < proxy(teacher, base_schedule(TINY, 1))  # beats 1-step DDIM
    _, model, schedule = load_distilled(result.checkpoint)
    assert schedule == result.schedule
    ours = generate(result.model, schedule, 4, 0, 8, 1)
    assert np.array_equal(np.array(generate(model, schedule, 4, 0, 8, 1)), np.array(ours))


def test_distill_entry_point_writes_the_stage_table(teacher, digits, proxy, tmp_path):
    state = init_state(TINY)
    state.model.update(teacher.parameters())
    state.ema = teacher.parameters()
    save_checkpoint(state, tmp_path / "teacher")
    dataset = load_dataset(None, image_size=8).subset(np.arange(500))
    result = distill(tmp_path / "teacher", "progressive", 2, dataset, tmp_path / "out",
                     gate=OPEN_GATE, teacher_steps=4, quality=proxy, train_steps=10, emit=quiet)
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [s["steps"] for s in written["stages"]] == [4, 2]
    assert written["final_stage"] == 1 and result.schedule.steps == 2
    with pytest.raises(ValueError, match="method"):
        distill(tmp_path / "teacher", "magic", 2, dataset, tmp_path / "x", quality=proxy)
    with pytest.raises(ValueError, match="16 px"):
        distill(tmp_path / "teacher", "progressive", 2, load_dataset(None, image_size=16),
                tmp_path / "x", quality=proxy)


def test_eps_teacher_is_reparametrised_to_v_matching_its_x0(digits):
    config = replace(TINY, schedule=ScheduleConfig(prediction="eps"))
    mx.random.seed(0)
    eps_teacher = UNet(config.unet)
    mx.eval(eps_teacher.parameters())
    x0 = mx.array(digits[-64:])
    t = mx.array(np.linspace(0.02, 1.0, 64, dtype=np.float32))
    a, s = (v[:, None, None, None] for v in alpha_sigma_mx(t, "cosine"))
    z = a * x0 + s * mx.random.normal(x0.shape, key=mx.random.key(4))
    wanted = mx.clip(to_x0_eps(eps_teacher(z, t), z, a, s, "eps")[0], -1, 1)

    def gap(model):
        return float(mx.mean((to_x0_eps(model(z, t), z, a, s, "v")[0] - wanted) ** 2))

    student = reparametrise(eps_teacher, config, digits, steps=200, learning_rate=3e-3,
                            batch_size=16)
    assert student is not eps_teacher and gap(student) < 0.6 * gap(eps_teacher), (gap(student), gap(eps_teacher))
    assert reparametrise(eps_teacher, TINY, digits, 60, 1e-3) is eps_teacher  # v: unchanged


def test_fid_quality_scores_samples_and_fails_a_diverged_model(teacher, tmp_path):
    dataset = load_dataset(None, image_size=8).subset(np.arange(120))
    quality = fid_quality(dataset, n=1000, cache_dir=tmp_path)  # n is capped at 60 here
    scores = quality(teacher, base_schedule(TINY, 2))
    assert np.isfinite(scores["fid"]) and np.isfinite(scores["kid"])
    broken = UNet(TINY.unet)
    broken.update(tree_map(lambda p: p * float("nan"), teacher.parameters()))
    assert quality(broken, base_schedule(TINY, 2))["fid"] == float("inf")
