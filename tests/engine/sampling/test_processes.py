"""A sampling batch's rows drawn by peer processes (engine.sampling.samplers): same samples."""

import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_map

from engine.config import ScheduleConfig, UNetConfig
from engine.model.unet import UNet
from engine.sampling import samplers
from engine.sampling.samplers import SAMPLE_ENV, generate, sample_processes

CFG = UNetConfig(image_size=8, channels=1, base_width=8, width_mults=(1, 2),
                 num_res_blocks=1, attn_levels=(1,), head_dim=8)


def _unet(cfg: UNetConfig = CFG) -> UNet:
    """Random weights everywhere: the zero-initialised output layer would hide any mix-up."""
    model = UNet(cfg)
    model.update(tree_map(lambda p: p + 0.2 * mx.random.normal(p.shape), model.parameters()))
    return model


def _both(monkeypatch, model, schedule, n):
    monkeypatch.setenv(SAMPLE_ENV, "1")
    one = generate(model, schedule, n, 7, 8, 1)
    monkeypatch.setenv(SAMPLE_ENV, "2")
    assert sample_processes(model, schedule, n) == 2
    return one, generate(model, schedule, n, 7, 8, 1)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_two_processes_draw_the_samples_one_process_draws(monkeypatch, sampler):
    mx.random.seed(3)
    model = _unet()
    one, split = _both(monkeypatch, model, ScheduleConfig(sampler=sampler, steps=4), 5)
    assert split.shape == one.shape == (5, 8, 8, 1)
    assert float(mx.abs(split - one).max()) < 1e-3


def test_a_split_conditional_batch_keeps_its_labels(monkeypatch):
    """The peer's rows are conditioned on the whole batch's labels (2, 0, 1 for rows 2:5),
    not on balanced labels of its own count (0, 1, 2)."""
    mx.random.seed(4)
    model = _unet(UNetConfig(**{**CFG.__dict__, "num_classes": 3}))
    one, split = _both(monkeypatch, model, ScheduleConfig(sampler="ddim", steps=3,
                                                          guidance=2.0), 5)
    assert float(mx.abs(split - one).max()) < 1e-3


def test_only_per_sample_samplers_on_float32_unets_split(monkeypatch):
    model = UNet(CFG)
    monkeypatch.delenv(SAMPLE_ENV, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert sample_processes(model, ScheduleConfig(sampler="ddim"), 16) == 2
    assert sample_processes(model, ScheduleConfig(sampler="ddim"), 1) == 1
    assert sample_processes(model, ScheduleConfig(sampler="ddim", eta=0.5), 16) == 1
    assert sample_processes(model, ScheduleConfig(sampler="ddpm"), 16) == 1
    assert sample_processes(model, ScheduleConfig(sampler="adaptive"), 16) == 1
    nn.quantize(model, group_size=32, bits=8,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
    assert sample_processes(model, ScheduleConfig(sampler="ddim"), 16) == 1
    for bad in ("two", "0"):
        monkeypatch.setenv(SAMPLE_ENV, bad)
        with pytest.raises(ValueError, match=SAMPLE_ENV):
            sample_processes(UNet(CFG), ScheduleConfig(sampler="ddim"), 16)


def test_a_dead_sampling_peer_is_named_and_replaced(monkeypatch):
    model = UNet(CFG)
    schedule = ScheduleConfig(sampler="ddim", steps=2)
    monkeypatch.setenv(SAMPLE_ENV, "2")
    generate(model, schedule, 4, 0, 8, 1)
    peer = samplers._PEERS[0].process
    peer.kill()
    peer.join()
    with pytest.raises(RuntimeError, match=r"peer process diffnas-sample-1 \(pid \d+\) died"):
        samplers._PEERS[0].request(("sample",))
    assert generate(model, schedule, 4, 0, 8, 1).shape == (4, 8, 8, 1)  # a new peer
