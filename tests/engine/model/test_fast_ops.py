"""The CPU-fast formulations (engine.model.conv, .norm, .activation) against MLX's own ops.

Each new formulation must give the same values and the same gradients as the layer it
replaces, to float32 tolerance, on random inputs; and a U-Net built from them must keep
the parameter tree of ``nn.Conv2d`` / ``nn.GroupNorm`` (names, shapes, initial values).
"""

import io

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from engine.config import UNetConfig
from engine.device import compile_mode
from engine.model import activation, conv, norm
from engine.model.unet import UNet


def _rel(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max() / mx.maximum(mx.abs(a).max(), 1e-12))


def _value_and_grads(f, args: list[mx.array], seed: int) -> tuple[mx.array, ...]:
    """``f(*args)`` and the gradient of ``sum(f * r)`` w.r.t. every arg, ``r`` random."""
    out = f(*args)
    r = mx.random.normal(out.shape, key=mx.random.key(seed))
    _, grads = mx.vjp(f, args, [r])
    return (out, *grads)


CONVS = [  # (batch, height, width, cin, cout, kernel, stride, padding)
    (2, 8, 8, 3, 5, 3, 1, 1),     # same-size, few rows: mx.conv2d forward
    (4, 16, 16, 8, 6, 3, 1, 1),   # same-size, enough rows: shifted-GEMM forward
    (3, 16, 12, 1, 4, 3, 1, 1),   # one input channel, non-square image
    (2, 16, 16, 4, 6, 5, 1, 2),   # 5x5 same-size
    (2, 9, 7, 4, 6, 3, 2, 1),     # the Downsample conv, odd sizes
    (2, 8, 8, 4, 6, 4, 2, 1),     # even kernel, stride 2
    (2, 8, 8, 4, 6, 3, 2, 0),     # no padding
    (2, 8, 8, 4, 6, 1, 2, 0),     # strided 1x1
    (2, 8, 8, 4, 6, 1, 1, 0),     # 1x1: a matmul
]


@pytest.mark.parametrize("b,h,w,cin,cout,k,stride,pad", CONVS)
def test_conv2d_matches_mlx_values_and_gradients(b, h, w, cin, cout, k, stride, pad):
    x = mx.random.normal((b, h, w, cin), key=mx.random.key(1))
    wt = mx.random.normal((cout, k, k, cin), key=mx.random.key(2))
    ref = _value_and_grads(lambda x, wt: mx.conv2d(x, wt, stride=stride, padding=pad),
                           [x, wt], 3)
    new = _value_and_grads(lambda x, wt: conv.conv2d(x, wt, stride, pad), [x, wt], 3)
    for name, a, c in zip(("y", "dx", "dw"), ref, new):
        assert a.shape == c.shape, name
        assert _rel(a, c) < 1e-5, name


def test_conv2d_module_keeps_nn_conv2d_parameters_and_falls_back_when_grouped():
    mx.random.seed(4)
    old = nn.Conv2d(6, 6, 3, padding=1, groups=3)
    mx.random.seed(4)
    new = conv.Conv2d(6, 6, 3, padding=1, groups=3)
    assert [(k, v.shape) for k, v in tree_flatten(old.parameters())] == \
        [(k, v.shape) for k, v in tree_flatten(new.parameters())]
    x = mx.random.normal((2, 5, 5, 6))
    assert mx.array_equal(old(x), new(x))


@pytest.mark.parametrize("compiled", ["on", "off"])  # fenced for compile, fewest ops eager
@pytest.mark.parametrize("shape,groups", [((3, 8, 8, 32), 8), ((2, 16, 16, 96), 32),
                                          ((2, 4, 4, 6), 1)])
def test_group_norm_matches_pytorch_compatible_group_norm(shape, groups, compiled, monkeypatch):
    monkeypatch.setitem(compile_mode.STATUS, "compile", compiled)
    old = nn.GroupNorm(groups, shape[-1], pytorch_compatible=True)
    new = norm.GroupNorm(groups, shape[-1])
    old.update({"weight": mx.random.normal((shape[-1],)), "bias": mx.random.normal((shape[-1],))})
    new.update(old.parameters())
    x = 3 * mx.random.normal(shape, key=mx.random.key(5)) + 1

    def run(m: nn.Module) -> tuple[mx.array, ...]:
        def f(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
            m.update({"weight": w, "bias": b})
            return m(x)
        return _value_and_grads(f, [x, old.weight, old.bias], 6)

    for name, a, c in zip(("y", "dx", "dweight", "dbias"), run(old), run(new)):
        assert _rel(a, c) < 2e-6, name
    graph = io.StringIO()
    mx.export_to_dot(graph, new(x))
    assert ("Contiguous" in graph.getvalue()) == (compiled == "on")


def test_softmax_matches_mlx_softmax_values_and_gradient():
    x = mx.concatenate([mx.linspace(-90, 90, 4096).reshape(4, 1024),
                        8 * mx.random.normal((12, 1024), key=mx.random.key(10))])
    y, dx = _value_and_grads(activation.softmax, [x], 11)
    y_ref, dx_ref = _value_and_grads(lambda x: mx.softmax(x, axis=-1), [x], 11)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(dx, dx_ref) < 1e-5
    # exp against float64 over float32's normal range, relative error
    xs = np.linspace(-87, 88, 100001, dtype=np.float32)
    exact = np.exp(xs.astype(np.float64))
    assert np.max(np.abs(np.array(activation.exp(mx.array(xs))) - exact) / exact) < 1e-6
    # bf16 in, bf16 out (a custom function's output must keep its input's dtype)
    xb = x.astype(mx.bfloat16)
    yb, dxb = _value_and_grads(activation.softmax, [xb], 11)
    assert yb.dtype == dxb.dtype == mx.bfloat16
    assert _rel(yb.astype(mx.float32), mx.softmax(xb, axis=-1).astype(mx.float32)) < 1e-2


def test_silu_matches_mlx_silu_values_and_gradient():
    x = mx.concatenate([mx.linspace(-30, 30, 4001), 4 * mx.random.normal((20000,))])
    y, dx = _value_and_grads(activation.silu, [x], 7)
    y_ref, dx_ref = _value_and_grads(nn.silu, [x], 7)
    assert float(mx.abs(y - y_ref).max()) < 5e-6  # |x| up to 30: a few ulp of the largest
    assert float(mx.abs(dx - dx_ref).max()) < 5e-6
    # Against float64: the rational tanh is a few float32 ulp from exact.
    xd = np.array(x, dtype=np.float64)
    exact = xd / (1 + np.exp(-xd))
    assert np.abs(np.array(y) - exact).max() < 1e-5 * np.abs(exact).max()


def test_unet_with_fast_ops_equals_unet_with_mlx_ops():
    """The whole network, forward and every weight's gradient, old layers vs new."""
    cfg = UNetConfig(image_size=16, channels=1, base_width=32, width_mults=(1, 2),
                     num_res_blocks=1, attn_levels=(1,), head_dim=32)
    mx.random.seed(8)
    model = UNet(cfg)
    x = mx.random.normal((4, 16, 16, 1), key=mx.random.key(9))
    t = mx.array([0.01, 0.3, 0.6, 1.0])

    def loss(m: nn.Module) -> tuple[mx.array, dict]:
        return nn.value_and_grad(m, lambda x, t: (m(x, t) ** 2).mean())(x, t)

    new_loss, new_grads = loss(model)
    _to_mlx_ops(model)
    old_loss, old_grads = loss(model)
    assert abs(float(new_loss) - float(old_loss)) < 1e-5 * abs(float(old_loss))
    old_flat, new_flat = dict(tree_flatten(old_grads)), dict(tree_flatten(new_grads))
    assert old_flat.keys() == new_flat.keys()
    for key, g in old_flat.items():
        assert _rel(g, new_flat[key]) < 1e-4, key


def _to_mlx_ops(model: nn.Module) -> None:
    """Swap every fast layer of ``model`` for MLX's own, keeping the weights."""
    for _, m in model.named_modules():
        if isinstance(m, conv.Conv2d):
            m.__class__ = nn.Conv2d
        elif isinstance(m, norm.GroupNorm):
            m.__class__ = nn.GroupNorm
        if getattr(m, "act", None) is activation.silu:
            m.act = nn.silu
