"""The memory-saving training modes (bf16/fp16, per-block checkpointing) stay correct."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.config import Config, TrainConfig, UNetConfig
from engine.io.checkpoint import load_checkpoint, save_checkpoint
from engine.model.unet import UNet
from engine.sampling.diffusion import diffusion_loss
from engine.training.objective import loss_and_grad
from engine.training.train import init_state, train

TINY = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, time_emb_dim=16),
              train=TrainConfig(steps=12, batch_size=8, eval_every=4, warmup_steps=2))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(size=(64, 8, 8, 1)), -1, 1).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_gradients_match_float32(dtype, images):
    mx.random.seed(0)
    model = UNet(TINY.unet)
    x0, key = mx.array(images[:16]), mx.random.key(3)

    def loss_fn(m, x, k):
        return diffusion_loss(m, x, k, "eps", "cosine")

    loss32, g32 = loss_and_grad(model, loss_fn, "float32")(x0, key)
    loss, grads = loss_and_grad(model, loss_fn, dtype)(x0, key)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    flat32, flat = (np.concatenate([np.array(g).ravel() for _, g in tree_flatten(t)])
                    for t in (g32, grads))
    assert abs(float(loss) - float(loss32)) < 0.02 * float(loss32)
    assert flat.dtype == np.float32
    # Close to float32, but not equal: the forward really ran in low precision.
    assert 0 < np.linalg.norm(flat - flat32) < 0.05 * np.linalg.norm(flat32)


def test_bf16_checkpointed_training_resumes_exactly(images, tmp_path):
    config = replace(TINY, train=replace(TINY.train, dtype="bfloat16", checkpointing=True))
    full = train(init_state(config), images, images[:16])
    half = train(init_state(config), images, images[:16], until=6)
    save_checkpoint(half, tmp_path / "ck")
    resumed = train(load_checkpoint(tmp_path / "ck"), images, images[:16])
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in full.history]
    assert all(np.isfinite(p.val_loss) for p in full.history)
