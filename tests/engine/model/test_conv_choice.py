"""Which conv formulation runs: GEMMs on MLX's CPU backend, MLX's own conv on a GPU."""

import mlx.core as mx
import numpy as np
import pytest

from engine.model.conv import Conv2d, gemm_convs


def test_the_cpu_runs_gemms_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("DIFFNAS_CONV", raising=False)
    with mx.stream(mx.cpu):
        assert gemm_convs() is (mx.default_device() == mx.cpu)
    monkeypatch.setenv("DIFFNAS_CONV", "mlx")
    assert gemm_convs() is False
    monkeypatch.setenv("DIFFNAS_CONV", "gemm")
    assert gemm_convs() is True


@pytest.mark.parametrize("stride", [1, 2])
def test_both_formulations_give_the_same_values_and_gradients(monkeypatch, stride):
    layer = Conv2d(8, 16, 3, stride=stride, padding=1)
    x = mx.random.normal((4, 16, 16, 8), key=mx.random.key(0))

    def run() -> tuple[np.ndarray, np.ndarray]:
        def loss(w: mx.array) -> mx.array:
            layer.weight = w
            return (layer(x) ** 2).sum()
        w = layer.weight
        value, grad = mx.value_and_grad(loss)(w)
        layer.weight = w
        return np.array(layer(x)), np.array(grad)

    monkeypatch.setenv("DIFFNAS_CONV", "gemm")
    y_gemm, g_gemm = run()
    monkeypatch.setenv("DIFFNAS_CONV", "mlx")
    y_mlx, g_mlx = run()
    np.testing.assert_allclose(y_gemm, y_mlx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_gemm, g_mlx, rtol=1e-3, atol=1e-3)
