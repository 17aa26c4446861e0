"""Shared by the memory tests: U-Nets the memory model was not calibrated on."""

import pytest

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig

HELD_OUT = {
    "8px-two-level": UNetConfig(image_size=8, base_width=16, norm_groups=4, time_emb_dim=32),
    "16px-attention": UNetConfig(base_width=24, attn_levels=(1,), head_dim=24, time_emb_dim=64),
    "8px-deep-relu": UNetConfig(image_size=8, base_width=16, width_mults=(1, 2, 2),
                                num_res_blocks=2, norm_groups=4, activation="relu",
                                time_emb_dim=32),
}


def pytest_generate_tests(metafunc):
    """A test that takes ``held_out`` runs once per held-out U-Net."""
    if "held_out" in metafunc.fixturenames:
        names = sorted(HELD_OUT)
        metafunc.parametrize("held_out", [HELD_OUT[n] for n in names], ids=names)


@pytest.fixture()
def attention():
    """The held-out U-Net with attention."""
    return HELD_OUT["16px-attention"]


@pytest.fixture()
def make_config():
    """``make_config(unet, **train)``: a 3-step sampling config with those train fields."""
    def make(unet: UNetConfig, **train) -> Config:
        return Config(unet=unet, schedule=ScheduleConfig(steps=3), train=TrainConfig(**train))
    return make
