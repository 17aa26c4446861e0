"""The batch split over CPU streams (engine.sampling.diffusion.cpu_streams): same samples."""

import mlx.core as mx
import pytest

from engine.config import ScheduleConfig, UNetConfig
from engine.model.unet import UNet
from engine.sampling.diffusion import compiled_forward, cpu_streams
from engine.sampling.samplers import generate

CFG = UNetConfig(image_size=8, channels=1, base_width=16, width_mults=(1, 2),
                 num_res_blocks=1, attn_levels=(1,), head_dim=16)


@pytest.mark.parametrize("streams", ["2", "3"])
def test_split_forward_equals_one_stream(monkeypatch, streams):
    mx.random.seed(3)
    model = UNet(CFG)
    x = mx.random.normal((5, 8, 8, 1), key=mx.random.key(4))  # 5: uneven parts
    t = mx.random.uniform(shape=(5,), key=mx.random.key(5))
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "1")
    one = compiled_forward(model)(x, t)
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", streams)
    split = compiled_forward(model)(x, t)
    assert split.shape == one.shape
    assert float(mx.abs(split - one).max()) < 1e-5 * float(mx.abs(one).max())


def test_split_sampling_equals_one_stream(monkeypatch):
    mx.random.seed(6)
    model = UNet(CFG)
    schedule = ScheduleConfig(sampler="ddim", steps=4)
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "1")
    one = generate(model, schedule, 4, 0, 8, 1)
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "2")
    split = generate(model, schedule, 4, 0, 8, 1)
    assert float(mx.abs(split - one).max()) < 1e-4


def test_stream_count_follows_the_blas_threads_and_rejects_bad_values(monkeypatch):
    monkeypatch.delenv("DIFFNAS_CPU_STREAMS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert cpu_streams() == 2
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "1")
    assert cpu_streams() == 1
    monkeypatch.setenv("DIFFNAS_CPU_STREAMS", "two")
    with pytest.raises(ValueError, match="DIFFNAS_CPU_STREAMS"):
        cpu_streams()
