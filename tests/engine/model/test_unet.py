import mlx.core as mx
import pytest

from engine.config import UNetConfig
from engine.model.cost import flops, layers, param_count
from engine.model.unet import UNet

VARIANTS = {
    "plain": UNetConfig(base_width=16, norm_groups=4),
    "attention": UNetConfig(base_width=16, norm_groups=4, width_mults=(1, 2, 2),
                            attn_levels=(1, 2), head_dim=16, num_res_blocks=2),
    "transposed-relu": UNetConfig(base_width=16, norm_groups=8, resample="transposed",
                                  activation="relu"),
    "separable-layernorm-gelu": UNetConfig(base_width=16, separable=True, norm="layer",
                                           activation="gelu", channels=3, image_size=8),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shape_and_analytic_param_count(name):
    cfg = VARIANTS[name]
    model = UNet(cfg)
    x = mx.random.normal((2, cfg.image_size, cfg.image_size, cfg.channels))
    y = model(x, mx.array([0.1, 0.9]))
    assert y.shape == x.shape
    assert model.num_params() == param_count(cfg)


def test_flops_scale_with_resolution_and_width():
    small = UNetConfig(base_width=16, norm_groups=4)
    assert flops(UNetConfig(base_width=16, norm_groups=4, image_size=32)) == pytest.approx(
        4 * flops(small), rel=0.01)
    assert flops(UNetConfig(base_width=32, norm_groups=4)) > 3.5 * flops(small)


def test_flops_of_first_conv_by_hand():
    cfg = UNetConfig(base_width=16, norm_groups=4, image_size=8, channels=1)
    conv_in = next(layer for layer in layers(cfg) if layer.name == "conv_in")
    assert conv_in.flops == 2 * 8 * 8 * 9 * 1 * 16


def test_time_conditioning_changes_output():
    cfg = VARIANTS["plain"]
    model = UNet(cfg)
    x = mx.random.normal((1, 16, 16, 1))
    assert not mx.allclose(model(x, mx.array([0.1])), model(x, mx.array([0.8])))
