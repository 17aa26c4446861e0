"""Compression: quantized convs against the float conv, pruning, and exact rollback."""

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from engine.compression.compress import (
    build,
    compress,
    digest,
    load_compressed,
    prune_blocks,
    prune_plan,
    save_compressed,
    weights_of,
)
from engine.compression.quant import (
    KEEP_FLOAT,
    QuantizedConv,
    dequantize_per_channel,
    quantize_model,
    quantize_per_channel,
)
from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.model.unet import UNet

# Stated tolerances: relative RMS error of a conv's output with quantized weights.
CONV_TOLERANCE = {8: 0.01, 4: 0.15}

TINY = Config(unet=UNetConfig(image_size=8, base_width=16, norm_groups=4, time_emb_dim=32),
              schedule=ScheduleConfig(steps=3),
              train=TrainConfig(batch_size=8, learning_rate=1e-3))


def _rel_rms(a: mx.array, b: mx.array) -> float:
    return float(mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean(b**2)))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups,cin,cout,k", [(1, 24, 16, 3), (1, 33, 8, 1), (12, 12, 12, 3)])
def test_quantized_conv_matches_float_conv(bits, groups, cin, cout, k):
    mx.random.seed(bits + cin)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
    x = mx.random.normal((2, 9, 9, cin))
    qconv = QuantizedConv.from_conv(conv, bits)
    # Oracle 1: every weight is within half a step of its per-channel code.
    w = np.array(conv.weight).reshape(cout, -1)
    step = np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)
    w_hat = np.array(qconv.weight()).reshape(cout, -1)
    assert np.all(np.abs(w_hat - w) <= step[:, None] / 2 + 1e-7)
    # Oracle 2: the output is the float conv of the dequantized weights.
    expected = mx.conv2d(x, mx.array(w_hat.reshape(conv.weight.shape)), padding=k // 2,
                         groups=groups) + conv.bias
    assert mx.allclose(qconv(x), expected, atol=1e-5)
    assert _rel_rms(qconv(x), conv(x)) < CONV_TOLERANCE[bits]
    if bits == 4:  # two codes per byte
        assert qconv.qweight.dtype == mx.uint8 and qconv.qweight.size == cout * ((w.shape[1] + 1) // 2)


def test_int4_packing_round_trips_every_code():
    w = mx.array(np.arange(-7, 8, dtype=np.float32).reshape(1, 15))  # scale 1: codes are w
    q, scale = quantize_per_channel(w, 4)
    assert np.array_equal(np.array(dequantize_per_channel(q, scale, 4, (1, 15))), np.array(w))


def test_quantized_transposed_conv_and_whole_unet():
    cfg = UNetConfig(image_size=8, base_width=32, norm_groups=8, resample="transposed",
                     time_emb_dim=32)
    model = UNet(cfg)
    x, t = mx.random.normal((2, 8, 8, 1)), mx.array([0.2, 0.7])
    reference = model(x, t)
    quantize_model(model, 8)
    floats = {name for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    assert floats == set(KEEP_FLOAT)  # first and last conv stay float, by design
    assert isinstance(model.upsamples[0].conv, QuantizedConv)
    assert _rel_rms(model(x, t), reference) < 0.05


def test_pruning_keeps_the_strongest_groups_and_runs():
    model = UNet(TINY.unet)
    block = model.down[0].blocks[0]
    w = block.conv1.conv.weight
    block.conv1.conv.weight = w * mx.array([0.01] * 4 + [1.0] * 12)[:, None, None, None]
    plan = prune_plan(model, 0.25)
    assert plan["down.0.blocks.0"] == list(range(4, 16))  # the weak group went first
    prune_blocks(model, plan)
    assert block.norm2.num_groups == 3 and block.conv2.conv.weight.shape[-1] == 12
    assert model(mx.zeros((1, 8, 8, 1)), mx.array([0.5])).shape == (1, 8, 8, 1)


def _closeness(reference: nn.Module):
    """A cheap deterministic stand-in for FID: 1 + output distance to the reference."""
    x = mx.random.normal((4, 8, 8, 1), key=mx.random.key(1))
    t = mx.array([0.1, 0.4, 0.6, 0.9])
    target = reference(x, t)
    return lambda m: 1.0 + 100 * float(mx.mean((m(x, t).astype(mx.float32) - target) ** 2))


@pytest.fixture(scope="module")
def tiny_model():
    mx.random.seed(0)
    model = UNet(TINY.unet)
    mx.eval(model.parameters())
    return model


def test_failed_level_rolls_back_bit_identically(tiny_model):
    images = np.clip(np.random.default_rng(0).normal(size=(32, 8, 8, 1)), -1, 1).astype(np.float32)
    original = digest(tiny_model)
    # int8 passes the gate; int4 fails it: the kept model must be int8, bit for bit.
    result = compress(tiny_model, TINY, _closeness(tiny_model), max_fid_increase=0.02,
                      levels={"prune": (0.5,), "quantize": (8, 4)}, data=(images, images[:8]),
                      finetune_steps=3)
    kept = [(r.method, r.level, r.kept) for r in result.rows]
    assert kept == [("baseline", "float32", True), ("prune", "50% groups", False),
                    ("quantize", "int8", True), ("quantize", "int4", False)]
    assert result.rows[1].digest == original  # prune (with its fine-tune) rolled back
    assert result.rows[3].digest == result.rows[2].digest != original
    assert digest(result.model()) == result.rows[2].digest
    assert digest(tiny_model) == original  # the input model is never modified
    assert [s["method"] for s in result.recipe] == ["quantize"]


def test_compressed_model_saves_and_loads_bit_identical(tiny_model, tmp_path):
    result = compress(tiny_model, TINY, lambda m: 1.0, levels={"prune": (0.25,), "quantize": (4,),
                                                                 "cast": ("bfloat16",)})
    assert all(r.kept for r in result.rows)
    assert result.rows[-1].size_mb < result.rows[0].size_mb / 4
    model = result.model()
    save_compressed(tmp_path / "c", TINY, result.recipe, model)
    _, recipe, loaded = load_compressed(tmp_path / "c")
    assert digest(loaded) == digest(model) == result.rows[-1].digest
    assert build(TINY, recipe).parameters().keys() == model.parameters().keys()
    (tmp_path / "c" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable compressed model"):
        load_compressed(tmp_path / "c")


def test_weights_snapshot_is_independent_of_later_training(tiny_model):
    snap = weights_of(tiny_model)
    before = digest(snap)
    tiny_model.conv_in.weight = tiny_model.conv_in.weight + 1
    try:
        assert digest(snap) == before != digest(tiny_model)
    finally:
        tiny_model.conv_in.weight = snap["conv_in.weight"]
