"""Tests for engine.quality.legibility: real digits read as digits, noise does not."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.datasets import load_dataset
from engine.quality.features import DIGITS_HOLDOUT, digits_feature_network
from engine.quality.legibility import legibility, legible, typical_set


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", image_size=16).split(*DIGITS_HOLDOUT)


@pytest.fixture(scope="module")
def typical(digits16):
    train, _ = digits16
    return typical_set(digits_feature_network(), train.images, train.labels)


def _noises(n: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (n, 16, 16, 1)
    return {"gaussian": np.clip(rng.standard_normal(shape), -1, 1).astype(np.float32),
            "uniform": rng.uniform(-1, 1, shape).astype(np.float32),
            "sparse": np.where(rng.uniform(size=shape) < 0.2, 1.0, -1.0).astype(np.float32)}


def test_probabilities_are_a_softmax_agreeing_with_predict(digits16) -> None:
    _, held = digits16
    net = digits_feature_network()
    probs = net.probabilities(held.images[:200], batch_size=64)
    assert probs.shape == (200, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs.argmax(axis=1) == net.predict(held.images[:200])).all()


def test_typical_set_covers_its_share_of_the_real_images(digits16, typical) -> None:
    train, _ = digits16
    net = digits_feature_network()
    inside = typical.distances(net.features(train.images),
                               net.probabilities(train.images).argmax(axis=1)) <= typical.radius
    assert inside.mean() == pytest.approx(0.99, abs=0.005)


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "sparse"])
def test_real_digits_are_legible_and_noise_is_not(digits16, typical, kind: str) -> None:
    _, held = digits16
    net = digits_feature_network()
    real = legibility(held.images, net, typical)
    noise = legibility(_noises()[kind], net, typical)
    assert real > 0.85
    assert noise < 0.1
    assert real > noise + 0.3


def test_the_typical_set_only_removes_images(digits16, typical) -> None:
    _, held = digits16
    net = digits_feature_network()
    images = np.concatenate([held.images[:200], _noises(100)["gaussian"]])
    both = legible(images, net, typical)
    assert (legible(images, net) | ~both).all()
    assert legible(images, net).sum() > both.sum()


def test_bad_arguments_name_the_culprit(digits16) -> None:
    train, held = digits16
    net = digits_feature_network()
    with pytest.raises(ValueError, match="threshold"):
        legibility(held.images[:10], net, threshold=0.0)
    with pytest.raises(ValueError, match="class 9"):
        typical_set(net, train.images[train.labels < 9], train.labels[train.labels < 9])
    with pytest.raises(ValueError, match="coverage"):
        typical_set(net, train.images, train.labels, coverage=1.5)
