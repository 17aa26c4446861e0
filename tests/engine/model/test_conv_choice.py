"""Which formulation runs: the CPU ones on MLX's CPU backend, MLX's own kernels on a GPU."""

import io
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from engine.config import UNetConfig
from engine.model.conv import Conv2d
from engine.model.formulation import cpu_layers, forward_only, gradients_stated
from engine.model.unet import Attention, UNet


def test_the_cpu_runs_its_formulations_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("DIFFNAS_LAYERS", raising=False)
    assert cpu_layers() is (mx.default_device() == mx.cpu)
    monkeypatch.setenv("DIFFNAS_LAYERS", "mlx")
    assert cpu_layers() is False
    monkeypatch.setenv("DIFFNAS_LAYERS", "cpu")
    assert cpu_layers() is True
    monkeypatch.setenv("DIFFNAS_LAYERS", "gpu")
    with pytest.raises(ValueError, match="DIFFNAS_LAYERS='gpu'"):
        cpu_layers()


def _values_and_grads(layer, x):
    """The layer's output and the gradient of a loss w.r.t. every parameter, as numpy."""
    value_and_grad = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())
    _, grads = value_and_grad(x)
    return np.array(layer(x)), [np.array(g) for _, g in tree_flatten(grads)]


@pytest.mark.parametrize("make", [lambda: Conv2d(8, 16, 3, stride=1, padding=1),
                                  lambda: Conv2d(8, 16, 3, stride=2, padding=1),
                                  lambda: Attention(UNetConfig(image_size=8, norm_groups=4,
                                                               head_dim=8), 16)],
                         ids=["conv", "strided-conv", "attention"])
def test_both_formulations_give_the_same_values_and_gradients(monkeypatch, make):
    layer = make()
    cin = 16 if isinstance(layer, Attention) else 8
    x = mx.random.normal((4, 8, 8, cin), key=mx.random.key(0))
    monkeypatch.setenv("DIFFNAS_LAYERS", "cpu")
    y_cpu, g_cpu = _values_and_grads(layer, x)
    monkeypatch.setenv("DIFFNAS_LAYERS", "mlx")
    y_mlx, g_mlx = _values_and_grads(layer, x)
    np.testing.assert_allclose(y_cpu, y_mlx, rtol=1e-4, atol=1e-4)
    assert len(g_cpu) == len(g_mlx) >= 2
    for a, b in zip(g_cpu, g_mlx, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def _graph(y):
    """The labels of the nodes that compute ``y`` (before it is evaluated)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, y)
    return re.findall(r'label ="([^"]*)"', buf.getvalue())


@pytest.mark.parametrize("batch", [1, 16])  # 16: 16*10*10 padded rows, the shifted GEMMs
def test_a_forward_pass_alone_traces_the_same_maths_in_fewer_nodes(batch):
    # Sampling takes no gradient: its trace leaves out the nodes that state one.
    model = UNet(UNetConfig(image_size=8, base_width=8, norm_groups=4, time_emb_dim=16,
                            attn_levels=(1,), head_dim=8))
    mx.eval(model.parameters())
    x, t = mx.random.normal((batch, 8, 8, 1), key=mx.random.key(1)), mx.full((batch,), 0.4)
    stated = model(x, t)
    with forward_only():
        alone = model(x, t)
    stated_nodes, alone_nodes = _graph(stated), _graph(alone)
    assert "CustomTransforms" in stated_nodes and "CustomTransforms" not in alone_nodes
    assert len(alone_nodes) < len(stated_nodes)
    assert mx.array_equal(stated, alone)
    assert gradients_stated()  # the context ends with its block


def test_the_shifted_gemms_read_their_taps_from_one_reordered_copy_of_the_weights(monkeypatch):
    # w[:, i, j, :].T per tap costs a slice, a squeeze and a transpose, and its row stride is
    # not one MLX hands to BLAS as is; one transpose of w, cut into row blocks, is neither.
    monkeypatch.setenv("DIFFNAS_LAYERS", "cpu")
    conv = Conv2d(8, 8, 3, padding=1)
    x = mx.random.normal((16, 16, 16, 8), key=mx.random.key(2))  # enough rows to shift
    mx.eval(conv.parameters(), x)
    with forward_only():
        y = conv(x)
    nodes = _graph(y)
    assert nodes.count("AddMM") == 8  # the shifted path: 9 taps, one accumulated GEMM each
    assert nodes.count("Transpose") == 1 and "Squeeze" not in nodes
    monkeypatch.setenv("DIFFNAS_LAYERS", "mlx")
    np.testing.assert_allclose(y, conv(x), rtol=1e-4, atol=1e-4)
