"""Memory: predictions against mx.get_peak_memory, budgets, checkpointing, mixed precision."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.sampling.diffusion import diffusion_loss
from engine.io.checkpoint import load_checkpoint, save_checkpoint
from engine.device.memory import (
    CALIBRATION_CONFIGS,
    MemoryBudgetExceeded,
    check_budget,
    enforce_limit,
    format_report,
    measure_sampling_mb,
    measure_train_step_mb,
    predict,
    recommend,
    release,
)
from engine.training.train import _loss_and_grad, init_state, train
from engine.model.unet import UNet

# Not among the calibration configs (asserted below): predictions must generalise.
HELD_OUT = {
    "8px-two-level": UNetConfig(image_size=8, base_width=16, norm_groups=4, time_emb_dim=32),
    "16px-attention": UNetConfig(base_width=24, attn_levels=(1,), head_dim=24, time_emb_dim=64),
    "8px-deep-relu": UNetConfig(image_size=8, base_width=16, width_mults=(1, 2, 2),
                                num_res_blocks=2, norm_groups=4, activation="relu",
                                time_emb_dim=32),
}
TOLERANCE = 0.20


def _config(u: UNetConfig, **train) -> Config:
    return Config(unet=u, schedule=ScheduleConfig(steps=3), train=TrainConfig(**train))


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_predictions_within_20_percent_of_measured(name):
    u = HELD_OUT[name]
    assert u not in CALIBRATION_CONFIGS.values()
    config = _config(u, batch_size=16)
    profile = predict(config, sample_n=8)
    for predicted, measured in ((profile.train_step_mb, measure_train_step_mb(config)),
                                (profile.sample_bn_mb, measure_sampling_mb(config, 8))):
        assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_checkpointing_and_bf16_lower_the_measured_training_peak():
    config = _config(HELD_OUT["16px-attention"], batch_size=16)
    plain = measure_train_step_mb(config)
    ckpt = measure_train_step_mb(replace(config, train=replace(config.train, checkpointing=True)))
    low = measure_train_step_mb(replace(config, train=replace(config.train, dtype="bfloat16")))
    assert ckpt < 0.9 * plain
    assert low < 0.9 * plain
    assert predict(config).train_step_mb > predict(replace(
        config, train=replace(config.train, checkpointing=True))).train_step_mb


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

    loss32, g32 = _loss_and_grad(model, loss_fn, "float32")(x0, key)
    loss, grads = _loss_and_grad(model, loss_fn, dtype)(x0, key)
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


def test_over_budget_candidate_fails_fast_without_allocating():
    config = _config(HELD_OUT["16px-attention"], batch_size=256)
    release()
    before = mx.get_active_memory()
    with pytest.raises(MemoryBudgetExceeded, match=r"predicted \d+ MB exceeds the budget of 50 MB"):
        check_budget(config, 50)
    ran = []
    with pytest.raises(MemoryBudgetExceeded) as info, enforce_limit(50, config=config):
        ran.append(True)
    assert not ran and info.value.needed_mb > info.value.budget_mb == 50
    assert isinstance(info.value, ValueError)  # trial runners treat it as infeasible input
    assert mx.get_peak_memory() < before + 2**20  # nothing was built or run


def test_measured_overrun_is_reported_and_the_process_carries_on():
    limit = mx.get_memory_limit()
    # MLX's limit is advisory: the check after the block catches the 16 MB run.
    with pytest.raises(MemoryBudgetExceeded, match="measured"), enforce_limit(4):
        mx.eval(mx.ones((4, 1024, 1024)))
    assert mx.get_memory_limit() == limit
    with enforce_limit(64):
        mx.eval(mx.ones((1024, 1024)))


def test_release_empties_the_cache():
    mx.eval(mx.ones((1024, 1024)) * 2)
    mx.synchronize()
    assert mx.get_cache_memory() > 0
    release()
    assert mx.get_cache_memory() == 0


def test_recommendation_finds_the_largest_batch_that_fits():
    config = _config(HELD_OUT["16px-attention"], batch_size=64)
    rec = recommend(config, budget_mb=120)
    assert predict(config, rec.max_batch).train_step_mb <= 120
    assert predict(config, rec.max_batch + 1).train_step_mb > 120
    assert not rec.fits and "use batch <=" in rec.reason
    by_name = {o.name: o for o in rec.options}
    assert by_name["checkpointing"].saving_mb > 0 and by_name["checkpointing"].time_factor > 1
    assert by_name["checkpointing"].max_batch > rec.max_batch
    nothing = recommend(config, budget_mb=1)
    assert not nothing.fits and nothing.max_batch == 0 and "does not fit at all" in nothing.reason
    report = format_report(config, budget_mb=120)
    assert "   256 " in report and "largest float32 batch" in report
