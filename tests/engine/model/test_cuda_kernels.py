"""A trial's graphs use no op that MLX's CUDA backend compiles at run time.

MLX on CUDA compiles some kernels with NVRTC at first use (``get_jit_module`` in
``mlx/backend/cuda``: indexing by arrays, scatters, slice updates, fused graphs), seconds
each in a process that starts with an empty kernel cache. On an H200 two of them, a gather
and its gradient's scatter-add from ``qkv[0]``, were 5.1 of the 6.3 s of a fresh process's
first forward and gradient (benchmarks/gpu/README.md, session 17). The graphs are read here on the CPU, traced as
the GPU runs them: MLX's own layers (``DIFFNAS_LAYERS=mlx``), nothing compiled.
"""

import re
from contextlib import contextmanager

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.model.unet import UNet, embed
from engine.sampling.diffusion import denoiser
from engine.training.objective import base_loss, loss_and_grad

NVRTC_ON_CUDA = {"Gather", "GatherAxis", "GatherMM", "Scatter", "ScatterAxis", "MaskedScatter",
                 "SliceUpdate", "DynamicSlice", "DynamicSliceUpdate", "Compiled", "CustomKernel",
                 "Hadamard"}
"""Primitives whose CUDA kernels MLX 0.32 builds with NVRTC (read in its source)."""

CONDITIONAL = UNetConfig(base_width=16, norm_groups=4, width_mults=(1, 2), attn_levels=(1,),
                         head_dim=16, num_classes=10)


@contextmanager
def as_on_the_gpu(monkeypatch):
    monkeypatch.setenv("DIFFNAS_LAYERS", "mlx")
    mx.disable_compile()  # the engine's default on a CUDA GPU (engine.device.compile_mode)
    try:
        yield
    finally:
        mx.enable_compile()


def primitives(tmp_path, *outputs: mx.array) -> set[str]:
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), *outputs)
    return set(re.findall(r'label ="([A-Za-z]+)"', dot.read_text()))


def test_a_train_step_and_guided_sampling_need_no_run_time_kernel(tmp_path, monkeypatch):
    cfg = Config(unet=CONDITIONAL, train=TrainConfig(batch_size=4, label_dropout=0.1),
                 schedule=ScheduleConfig(guidance=2.0))
    x0 = mx.random.normal((4, 16, 16, 1))
    labels = mx.array([0, 3, 9, 3], dtype=mx.int32)
    with as_on_the_gpu(monkeypatch):
        model = UNet(CONDITIONAL)
        loss, grads = loss_and_grad(model, base_loss(cfg), "float32")(x0, mx.random.key(0),
                                                                      labels)
        step = primitives(tmp_path, loss, *[g for _, g in tree_flatten(grads)])
        denoise = denoiser(model, "v", "cosine", guidance=2.0, labels=labels)
        sample = primitives(tmp_path, *denoise(x0, 0.5))
    assert "Convolution" in step and "Convolution" in sample  # the whole network was read
    assert not step & NVRTC_ON_CUDA, step & NVRTC_ON_CUDA
    assert not sample & NVRTC_ON_CUDA, sample & NVRTC_ON_CUDA


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_label_embedding_is_the_table_row_and_its_gradient_the_scatter_add(dtype):
    table = mx.random.normal((11, 24)).astype(dtype)
    y = mx.array([0, 3, 10, 3, 7, 3], dtype=mx.int32)
    assert mx.array_equal(embed(table, y), table[y]).item()
    weights = mx.random.normal((6, 24)).astype(dtype)
    ours = mx.grad(lambda w: (embed(w, y) * weights).sum())(table)
    gather = mx.grad(lambda w: (w[y] * weights).sum())(table)
    assert mx.allclose(ours.astype(mx.float32), gather.astype(mx.float32), rtol=2e-2,
                       atol=2e-2).item()  # bfloat16: three rows summed in another order
