from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from engine.config import Config, TrainConfig, UNetConfig
from engine.model import morph
from engine.model.unet import UNet
from engine.sampling.diffusion import diffusion_loss
from engine.training.train import init_state, train

TOL = 1e-5

ARCHS = {
    "plain": UNetConfig(image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2),
                        time_emb_dim=16, head_dim=8),
    "attn-separable-transposed": UNetConfig(
        image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2, 2), time_emb_dim=16,
        attn_levels=(1, 2), head_dim=8, num_res_blocks=2, separable=True,
        resample="transposed", activation="relu"),
    "layernorm-gelu-attn0": UNetConfig(
        image_size=8, base_width=8, norm_groups=2, width_mults=(2, 1), norm="layer",
        activation="gelu", time_emb_dim=16, attn_levels=(0,), head_dim=4),
}


def perturbed_params(cfg: UNetConfig, seed: int = 0) -> dict:
    """Random weights, norm affines included, so that no morphism passes by accident."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    params = UNet(cfg).parameters()
    return tree_map(lambda v: mx.array(np.array(v) + 0.2 * rng.normal(size=v.shape)
                                       .astype(np.float32)), params)


def forward(cfg: UNetConfig, params: dict, x: mx.array, t: mx.array) -> np.ndarray:
    model = UNet(cfg)
    model.update(params)  # strict: the tree must match the new architecture exactly
    return np.array(model(x, t))


def inputs(cfg: UNetConfig):
    mx.random.seed(1)
    x = mx.random.normal((3, cfg.image_size, cfg.image_size, cfg.channels))
    return x, mx.array([0.05, 0.5, 0.95])


def check_same_function(cfg, params, new_cfg, new_params):
    x, t = inputs(cfg)
    before, after = forward(cfg, params, x, t), forward(new_cfg, new_params, x, t)
    assert np.abs(before).max() > 0.5  # the test is not trivial
    assert np.abs(after - before).max() <= TOL


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_widen_preserves_output(name):
    cfg = ARCHS[name]
    params = perturbed_params(cfg)
    new_cfg, new_params = morph.widen(cfg, params)
    assert new_cfg.widths == tuple(2 * w for w in cfg.widths)
    check_same_function(cfg, params, new_cfg, new_params)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_deepen_preserves_output(name):
    cfg = ARCHS[name]
    params = perturbed_params(cfg)
    new_cfg, new_params = morph.deepen(cfg, params)
    assert new_cfg.num_res_blocks == cfg.num_res_blocks + 1
    check_same_function(cfg, params, new_cfg, new_params)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_exact_folds_and_attention_preserve_output(name):
    cfg = ARCHS[name]
    params = perturbed_params(cfg)
    for fold in (morph.densify, morph.to_transposed):
        check_same_function(cfg, params, *fold(cfg, params))
    level = next(lv for lv, w in enumerate(cfg.widths)
                 if lv not in cfg.attn_levels and w % cfg.head_dim == 0)
    check_same_function(cfg, params, *morph.add_attention(cfg, params, level))


def test_widen_one_level_is_close_and_deepen_twice_composes():
    cfg = ARCHS["attn-separable-transposed"]
    params = perturbed_params(cfg)
    wide_cfg, wide = morph.widen(cfg, params, level=1)
    assert wide_cfg.widths == (8, 32, 16)
    x, t = inputs(cfg)
    before, after = forward(cfg, params, x, t), forward(wide_cfg, wide, x, t)
    # Only the GroupNorms straddling two levels change: close, not exact.
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()
    check_same_function(cfg, params, *morph.deepen(*morph.deepen(cfg, params)))


def test_widen_refuses_a_vanishing_projection():
    cfg = ARCHS["plain"]  # widths (8, 16): level 0 doubled makes down.1.blocks.0 16 -> 16
    with pytest.raises(ValueError, match="residual projection"):
        morph.widen(cfg, perturbed_params(cfg), level=0)


def test_narrow_keeps_the_strongest_channels_and_builds():
    cfg = ARCHS["attn-separable-transposed"]
    params = perturbed_params(cfg)
    new_cfg, new_params = morph.narrow(cfg, params, level=1, keep=8)
    assert new_cfg.widths == (8, 8, 16)
    x, t = inputs(cfg)
    assert forward(new_cfg, new_params, x, t).shape == x.shape
    with pytest.raises(ValueError, match="keep"):
        morph.narrow(cfg, params, level=1, keep=12)


SPACE = [ARCHS["plain"], ARCHS["attn-separable-transposed"],
         UNetConfig(image_size=16, base_width=32, width_mults=(1, 2, 4), attn_levels=(2,),
                    head_dim=64, norm_groups=8)]


@pytest.mark.parametrize("parent", range(len(SPACE)))
def test_mutations_are_valid_configs_and_inherit_builds(parent):
    cfg = SPACE[parent]
    params = perturbed_params(cfg)
    inherited = 0
    for seed in range(60):
        child = morph.mutate(cfg, seed, quantum=8)
        assert isinstance(child, UNetConfig) and child != cfg
        assert UNetConfig(**child.__dict__) == child  # re-validates
        changed = {f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(child, f)}
        assert len(changed) == 1, changed
        for old, new in zip(cfg.widths, child.widths):
            assert new == old or new % 8 == 0
        if seed % 6 == 0:  # building every child is slow; a sample checks the trees
            weights = morph.inherit(cfg, params, child)
            if weights is not None:
                inherited += 1
                x, t = inputs(child)
                assert forward(child, weights, x, t).shape == x.shape
    assert inherited > 0


def test_mutate_keeps_multiples_of_16_by_default():
    cfg = SPACE[2]
    for seed in range(200):
        child = morph.mutate(cfg, np.random.default_rng(seed))
        assert all(w % 16 == 0 and w <= 512 for w in child.widths)
        assert child.num_res_blocks >= 1


def test_inherit_exact_chain_and_unreachable():
    cfg = ARCHS["attn-separable-transposed"]
    params = perturbed_params(cfg)
    child = replace(cfg, base_width=16, num_res_blocks=3, separable=False)
    weights = morph.inherit(cfg, params, child)
    assert weights is not None
    check_same_function(cfg, params, child, weights)
    assert morph.inherit(cfg, params, replace(cfg, time_emb_dim=32)) is None
    assert morph.inherit(cfg, params, replace(cfg, resample="nearest")) is None
    assert morph.inherit(cfg, params, replace(cfg, base_width=24, norm_groups=4)) is None


TINY = Config(unet=UNetConfig(image_size=8, base_width=8, norm_groups=4, width_mults=(1, 2),
                              time_emb_dim=16),
              train=TrainConfig(steps=40, batch_size=16, eval_every=40, warmup_steps=5,
                                learning_rate=3e-3))


def _images(n: int = 128) -> np.ndarray:
    """Vertical ramps of random slope: simple data a tiny net learns in a few dozen steps."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, 8, dtype=np.float32)[None, :, None, None]
    slope = rng.uniform(0.3, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
    return np.clip(slope * ramp + 0.05 * rng.normal(size=(n, 8, 8, 1)), -1, 1).astype(np.float32)


def _loss(model, cfg: Config, x0: np.ndarray) -> float:
    s = cfg.schedule
    return float(diffusion_loss(model, mx.array(x0), mx.random.key(7), s.prediction,
                                s.beta_schedule).item())


@pytest.fixture(scope="module")
def trained_parent():
    images = _images()
    return train(init_state(TINY), images, images[:32]), images


def test_inherited_weights_start_at_a_lower_loss(trained_parent):
    parent, images = trained_parent
    batch = images[:64]
    grow = {"widen": morph.widen, "widen level 1": lambda c, p: morph.widen(c, p, 1),
            "deepen": morph.deepen}
    for name, op in grow.items():
        child_unet, params = op(TINY.unet, parent.model.parameters())
        child = replace(TINY, unet=child_unet)
        inherited = morph.inherited_state(child, params).model
        fresh = init_state(child).model
        ours, theirs = _loss(inherited, child, batch), _loss(fresh, child, batch)
        print(f"{name}: inherited {ours:.4f} vs fresh {theirs:.4f}")
        assert ours < 0.8 * theirs, name


def test_narrow_recovers_with_a_short_fine_tune(trained_parent):
    parent, images = trained_parent
    child_unet, params = morph.narrow(TINY.unet, parent.model.parameters(), level=1, keep=8)
    child = replace(TINY, unet=child_unet, train=replace(TINY.train, steps=10))
    state = morph.inherited_state(child, params)
    start = _loss(state.model, child, images[:64])
    train(state, images, images[:32])
    assert _loss(state.model, child, images[:64]) < start
    assert set(dict(tree_flatten(state.ema))) == set(dict(tree_flatten(
        UNet(child_unet).parameters())))


def test_narrow_everything_halves_base_width_and_builds():
    cfg = ARCHS["attn-separable-transposed"]
    params = perturbed_params(cfg)
    wide_cfg, wide = morph.widen(cfg, params)
    back_cfg, back = morph.narrow(wide_cfg, wide)
    assert back_cfg == cfg
    x, t = inputs(cfg)
    assert forward(back_cfg, back, x, t).shape == x.shape
    assert morph.inherit(wide_cfg, wide, cfg) is not None
