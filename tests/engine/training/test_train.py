import json
from dataclasses import replace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, TrainConfig, UNetConfig
from engine.io.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from engine.training.train import (
    TrainingDiverged,
    compiled_update,
    init_state,
    learning_rate_schedule,
    train,
)

TINY = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2),
                              time_emb_dim=16),
              train=TrainConfig(steps=12, batch_size=8, eval_every=4, warmup_steps=2))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = np.linspace(-1, 1, 8, dtype=np.float32)[None, :, None, None]
    return np.clip(base + 0.1 * rng.normal(size=(64, 8, 8, 1)), -1, 1).astype(np.float32)


def test_loss_decreases_and_callback_every_k(images):
    points = []
    state = train(init_state(replace(TINY, train=replace(TINY.train, steps=40, eval_every=10))),
                  images, images[:16], callback=points.append)
    assert [p.step for p in points] == [10, 20, 30, 40]
    assert points[-1].train_loss < points[0].train_loss
    assert state.step == 40


def test_every_step_runs_inside_the_guard(images):
    import contextlib

    log = []

    @contextlib.contextmanager
    def guard():
        log.append("enter")
        yield
        log.append("exit")

    state = train(init_state(TINY), images, images[:16], until=6, guard=guard)
    assert state.step == 6 and log == ["enter", "exit"] * 6


def test_callback_false_stops_training(images):
    state = train(init_state(TINY), images, images[:16], callback=lambda p: False)
    assert state.step == 4


def test_resume_reproduces_uninterrupted_curve(images, tmp_path):
    full = train(init_state(TINY), images, images[:16])
    half = train(init_state(TINY), images, images[:16], until=6)
    save_checkpoint(half, tmp_path / "ck")
    resumed = train(load_checkpoint(tmp_path / "ck"), images, images[:16])
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in full.history]
    assert [p.val_loss for p in resumed.history] == [p.val_loss for p in full.history]


def test_cosine_decay_warms_up_then_ends_at_zero_and_resumes_on_its_curve(images, tmp_path):
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=2e-3, lr_decay="cosine")
    lr = learning_rate_schedule(cfg)
    at = [float(lr(mx.array(i))) for i in (0, 9, 10, 55, 99)]
    held = learning_rate_schedule(replace(cfg, lr_decay="none"))
    assert at[0] == pytest.approx(float(held(mx.array(0))))  # the same warm-up
    assert at[2] == pytest.approx(2e-3) and at[3] == pytest.approx(1e-3, rel=1e-3)
    assert at[4] < 1e-6 < at[3] < at[2]
    assert float(held(mx.array(99))) == pytest.approx(2e-3)

    decayed = replace(TINY, train=replace(TINY.train, lr_decay="cosine"))
    full = train(init_state(decayed), images, images[:16])
    assert [p.train_loss for p in full.history] != [p.train_loss
                                                   for p in train(init_state(TINY), images,
                                                                  images[:16]).history]
    save_checkpoint(train(init_state(decayed), images, images[:16], until=6), tmp_path / "ck")
    resumed = train(load_checkpoint(tmp_path / "ck"), images, images[:16])
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in full.history]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_never_exceed_one_and_training_still_learns(images, prediction):
    from engine.sampling.diffusion import diffusion_loss

    model = init_state(TINY).model
    x0, key = mx.array(images[:32]), mx.random.key(3)
    plain = diffusion_loss(model, x0, key, prediction, "cosine").item()
    weighted = diffusion_loss(model, x0, key, prediction, "cosine", weighting="min_snr").item()
    assert 0.0 < weighted < plain  # w = min(SNR, 5) / SNR (eps) or / (SNR + 1) (v), <= 1

    cfg = replace(TINY, train=replace(TINY.train, steps=40, eval_every=10, loss_weight="min_snr"))
    state = train(init_state(cfg), images, images[:16])
    assert state.history[-1].train_loss < state.history[0].train_loss


def test_checkpoint_loads_bit_identical(images, tmp_path):
    state = train(init_state(TINY), images, images[:16], until=3)
    save_checkpoint(state, tmp_path / "ck")
    _, model = load_weights(tmp_path / "ck")
    from mlx.utils import tree_flatten
    ours = dict(tree_flatten(state.ema))
    for key, value in tree_flatten(model.parameters()):
        assert np.array_equal(np.array(value), np.array(ours[key]))


def test_nan_loss_raises_clear_error(images):
    bad = replace(TINY, train=replace(TINY.train, learning_rate=1e6, grad_clip=0.0, warmup_steps=0,
                                      steps=200))
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train(init_state(bad), images * 1e3, images[:16])


def test_corrupt_truncated_and_mismatched_checkpoints_name_the_file(images, tmp_path):
    state = train(init_state(TINY), images, images[:16], until=2)
    folder = save_checkpoint(state, tmp_path / "ck")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)
    save_checkpoint(state, folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["unet"]["base_width"] = 16
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.safetensors.*shape|does not match"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_compiled_update_takes_any_loss_and_steps_like_plain_gradient_descent():
    mx.random.seed(0)
    model, teacher = nn.Linear(4, 4), nn.Linear(4, 4)
    start = tree_map(lambda p: p, model.parameters())

    def loss_fn(m, x0, key):  # a distillation-shaped loss: the teacher is bound in
        return mx.mean((m(x0) - teacher(x0 + mx.random.normal(x0.shape, key=key))) ** 2)

    update = compiled_update(model, optim.SGD(learning_rate=0.1), loss_fn, grad_clip=0.0,
                             frozen=[teacher.state])
    x, key = mx.random.normal((8, 4), key=mx.random.key(1)), mx.random.key(2)
    reference = nn.Linear(4, 4)
    reference.update(start)
    loss, grads = nn.value_and_grad(reference, lambda a, k: loss_fn(reference, a, k))(x, key)
    assert float(update(x, key)) == pytest.approx(float(loss), rel=1e-6)
    expected = tree_map(lambda p, g: p - 0.1 * g, start, grads)
    for got, want in zip(tree_map(np.array, model.parameters()).values(),
                         tree_map(np.array, expected).values()):
        assert np.allclose(got, want, atol=1e-6)
