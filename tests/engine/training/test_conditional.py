"""Class-conditional networks and classifier-free guidance (Ho & Salimans 2022), for real:
a small U-Net trained on the built-in digits with their labels, sampled guided."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.data.datasets import labels_of, load_dataset
from engine.device.memory.model import CALIBRATION, peak_mb, predict
from engine.measure import sample_images, sample_labels
from engine.model.cost import param_count
from engine.model.latency import LatencyTable, forward_needs, raw_latency_ms
from engine.model.unet import UNet
from engine.sampling.diffusion import compiled_forward, denoiser, to_x0_eps
from engine.sampling.samplers import generate
from engine.training.train import init_state, train, validation_loss

UNET = UNetConfig(image_size=16, base_width=8, width_mults=(1, 2), time_emb_dim=16,
                  norm_groups=4, num_classes=10)
CONFIG = Config(UNET, ScheduleConfig(prediction="v", sampler="ddim", steps=4, guidance=2.0),
                TrainConfig(steps=30, batch_size=16, eval_every=15, warmup_steps=5))


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", image_size=16)
    return ds.split(0.1, 0)


@pytest.fixture(scope="module")
def trained(digits):
    tr, va = digits
    return train(init_state(CONFIG), tr.images, va.images, labels=labels_of(tr, va))


def test_guidance_needs_a_conditional_network_and_a_grid_sampler():
    with pytest.raises(ValueError, match=r"guidance=2.0: needs a class-conditional"):
        Config(replace(UNET, num_classes=0), CONFIG.schedule)
    with pytest.raises(ValueError, match=r"ScheduleConfig.guidance=2.0: must be 1 with the adaptive"):
        ScheduleConfig(sampler="adaptive", guidance=2.0)
    with pytest.raises(ValueError, match=r"UNetConfig.num_classes=-1"):
        replace(UNET, num_classes=-1)
    assert CONFIG.passes == 2 and replace(CONFIG, schedule=ScheduleConfig()).passes == 1
    assert Config.from_dict(CONFIG.to_dict()) == CONFIG


def test_label_embedding_is_counted_and_leaves_an_unconditional_net_unchanged():
    mx.random.seed(0)
    plain = UNet(replace(UNET, num_classes=0))
    mx.random.seed(0)
    cond = UNet(UNET)
    assert cond.num_params() == param_count(UNET)
    assert cond.num_params() - plain.num_params() == 11 * UNET.time_emb_dim
    # created last: every weight of the unconditional net is drawn the same
    flat = dict(tree_flatten(cond.parameters()))
    assert all(np.array_equal(np.array(v), np.array(flat[k]))
               for k, v in tree_flatten(plain.parameters()))


def test_training_needs_labels_in_range(digits):
    tr, va = digits
    with pytest.raises(ValueError, match=r"num_classes=10: the dataset has no labels"):
        train(init_state(CONFIG), tr.images, va.images)
    with pytest.raises(ValueError, match=r"num_classes=4: training labels span \[0, 9\]"):
        cfg = replace(CONFIG, unet=replace(UNET, num_classes=4))
        train(init_state(cfg), tr.images, va.images, labels=labels_of(tr, va))


def test_the_label_changes_the_prediction_once_trained(trained, digits):
    _, va = digits
    assert trained.history[-1].val_loss < trained.history[0].val_loss
    model = trained.ema_model()
    x, t = mx.random.normal((10, 16, 16, 1), key=mx.random.key(1)), mx.full((10,), 0.5)
    outs = [np.array(model(x, t, mx.full((10,), c, dtype=mx.int32))) for c in (3, 7)]
    assert np.abs(outs[0] - outs[1]).mean() > 1e-3
    # the labelled validation loss differs from the null-label (unconditional) one
    labelled = validation_loss(model, CONFIG, va.images, va.labels)
    assert labelled != validation_loss(model, CONFIG, va.images)


def test_guided_denoiser_is_u_plus_w_c_minus_u(trained):
    model, w = trained.ema_model(), 2.5
    x = mx.random.normal((4, 16, 16, 1), key=mx.random.key(2))
    y = mx.array([1, 2, 3, 4], dtype=mx.int32)
    x0, _ = denoiser(model, "v", "cosine", clip_x0=False, guidance=w, labels=y)(x, 0.6)
    forward, tt = compiled_forward(model), mx.full((4,), 0.6)
    c, u = forward(x, tt, y), forward(x, tt, mx.full((4,), 10, dtype=mx.int32))
    from engine.sampling.schedules import alpha_sigma
    a, s = (float(v) for v in alpha_sigma(0.6, "cosine"))
    want, _ = to_x0_eps(u + w * (c - u), x, a, s, "v")
    np.testing.assert_allclose(np.array(x0), np.array(want), atol=1e-4)
    with pytest.raises(ValueError, match="needs a class-conditional network"):
        denoiser(UNet(replace(UNET, num_classes=0)), "v", "cosine", guidance=2.0)


def test_samples_are_drawn_for_every_class_equally(trained):
    model = trained.ema_model()
    labels = sample_labels(25, 10)
    assert np.bincount(labels).tolist() == [3] * 5 + [2] * 5
    a = sample_images(model, CONFIG, 12, seed=0, batch=5)  # chunks keep j mod 10
    assert a.shape == (12, 16, 16, 1) and np.isfinite(a).all()
    # the chunk of images 10-11 is drawn from seed 10 for classes 0 and 1
    chunk = generate(model, CONFIG.schedule, 2, 10, 16, 1, labels=mx.array([0, 1]))
    np.testing.assert_allclose(a[10:], np.array(chunk), atol=1e-5)
    other = generate(model, CONFIG.schedule, 2, 10, 16, 1, labels=mx.array([5, 6]))
    assert np.abs(a[10:] - np.array(other)).mean() > 1e-3


def test_latency_and_memory_models_count_the_doubled_batch():
    table = LatencyTable({"chip": "test"})  # measures the blocks it lacks, here and now
    guided, plain = CONFIG, replace(CONFIG, schedule=replace(CONFIG.schedule, guidance=1.0))
    raw_latency_ms(guided, table)
    assert {n.key for n in forward_needs(UNET, 2)} <= set(table.entries)
    assert not {n.key for n in forward_needs(UNET, 1)} & set(table.entries)
    raw_latency_ms(plain, table)
    assert {n.key for n in forward_needs(UNET, 1)} <= set(table.entries)
    fits = CALIBRATION["fits"]
    assert predict(guided).sample_b1_mb == pytest.approx(peak_mb(UNET, 2, fits["sample"]))
    assert predict(plain).sample_b1_mb == pytest.approx(peak_mb(UNET, 1, fits["sample"]))


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_a_conditional_teacher_distils_with_its_labels(trained, tmp_path, method):
    from engine.io.checkpoint import save_checkpoint
    from engine.training.distill import distill
    from engine.training.quality_gate import sample_error_quality
    from engine.training.stages import Gate

    save_checkpoint(trained, tmp_path / "teacher")
    dataset = load_dataset("digits", image_size=16).subset(np.arange(300))
    teacher = trained.ema_model()
    reference = np.array(generate(teacher, replace(CONFIG.schedule, steps=8), 8, 3, 16, 1))
    quality = sample_error_quality(reference, seed=3)
    result = distill(tmp_path / "teacher", method, 2, dataset, tmp_path / "out",
                     gate=Gate(max_fid_ratio=1e6, max_retries=0), teacher_steps=4,
                     quality=quality, train_steps=6, emit=lambda _: None)
    assert result.schedule.guidance == CONFIG.schedule.guidance  # the student is guided too
    drawn = [np.array(generate(result.model, result.schedule, 2, 0, 16, 1,
                               labels=mx.array(y))) for y in ([1, 2], [7, 8])]
    assert np.isfinite(drawn[0]).all() and np.abs(drawn[0] - drawn[1]).mean() > 1e-4
    unlabelled = replace(dataset, labels=None)
    with pytest.raises(ValueError, match="has no labels; the checkpoint is conditioned on 10"):
        distill(tmp_path / "teacher", method, 2, unlabelled, tmp_path / "x", quality=quality)


def test_a_morphism_keeps_the_label_embedding(trained):
    from engine.model.morph import inherit

    parent = trained.ema_model()
    child_cfg = replace(UNET, base_width=16, norm_groups=4)  # widen x2: function-preserving
    child = UNet(child_cfg)
    child.update(inherit(UNET, parent.parameters(), child_cfg))
    x, t = mx.random.normal((3, 16, 16, 1), key=mx.random.key(4)), mx.full((3,), 0.4)
    y = mx.array([0, 5, 9], dtype=mx.int32)
    np.testing.assert_allclose(np.array(child(x, t, y)), np.array(parent(x, t, y)), atol=1e-4)
    assert inherit(UNET, parent.parameters(), replace(UNET, num_classes=5)) is None
