"""Tests for engine.quality.features: the shipped digits network and per-dataset cached networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data.datasets import Dataset, dataset_fingerprint, load_dataset
from engine.quality.features import (
    DIGITS_HOLDOUT,
    DIGITS_WEIGHTS,
    FeatureNetwork,
    digits_feature_network,
    feature_network_for,
)


def test_shipped_weights_are_small() -> None:
    assert DIGITS_WEIGHTS.stat().st_size < 1_000_000


@pytest.mark.parametrize(("size", "minimum"), [(28, 0.95), (16, 0.95), (8, 0.88)])
def test_shipped_network_classifies_held_out_digits(size: int, minimum: float) -> None:
    _, held = load_dataset("digits", image_size=size).split(*DIGITS_HOLDOUT)
    accuracy = (digits_feature_network().predict(held.images) == held.labels).mean()
    assert accuracy > minimum


def test_features_shape_scale_and_channel_check() -> None:
    net = digits_feature_network()
    images = load_dataset("digits", image_size=32).images[::50]
    feats = net.features(images, batch_size=33)
    assert feats.shape == (100, net.config.feature_dim) and feats.dtype == np.float64
    # Standardised embedding: root-mean-square about 1 on real digits.
    assert 0.5 < np.sqrt(np.mean(feats**2)) < 2.0
    with pytest.raises(ValueError, match="1 channel"):
        net.features(np.repeat(images, 3, axis=3))


def test_builtin_digits_get_the_shipped_network(tmp_path: Path) -> None:
    ds = load_dataset("digits", image_size=16)
    assert feature_network_for(ds, tmp_path) is digits_feature_network()
    assert not any(tmp_path.iterdir())


def _tiny_dataset(labelled: bool) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (40, 12, 12, 3)).astype(np.float32)
    labels = np.arange(40) % 3 if labelled else None
    return Dataset(images, labels, "tiny")


@pytest.mark.parametrize(
    ("labelled", "task", "classes"), [(True, "classify", 3), (False, "rotation", 4)]
)
def test_user_network_is_trained_once_and_cached(
    tmp_path: Path, labelled: bool, task: str, classes: int
) -> None:
    ds = _tiny_dataset(labelled)
    net = feature_network_for(ds, tmp_path, steps=2)
    assert (net.config.task, net.config.num_classes, net.config.in_channels) == (task, classes, 3)
    cached = tmp_path / f"feature_net_{dataset_fingerprint(ds)}.safetensors"
    assert cached.exists()
    stamp = cached.stat().st_mtime_ns
    again = feature_network_for(ds, tmp_path, steps=2)
    assert cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.features(ds.images), net.features(ds.images))


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    ds = _tiny_dataset(labelled=False)
    cached = tmp_path / f"feature_net_{dataset_fingerprint(ds)}.safetensors"
    cached.write_bytes(b"garbage")
    net = feature_network_for(ds, tmp_path, steps=1)
    assert FeatureNetwork.load(cached).config == net.config


def test_load_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="weights.safetensors"):
        FeatureNetwork.load(bad)


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    net = digits_feature_network()
    net.save(tmp_path / "copy.safetensors")
    images = load_dataset("digits", image_size=28).images[:20]
    for back in (
        FeatureNetwork.load(tmp_path / "copy.safetensors"),
        FeatureNetwork.from_bytes(net.to_bytes()),
    ):
        np.testing.assert_array_equal(back.features(images), net.features(images))
        assert back.config == net.config and back.info == net.info


def test_sparse_label_values_become_classes(tmp_path: Path) -> None:
    ds = _tiny_dataset(labelled=True)
    sparse = Dataset(ds.images, np.where(ds.labels == 0, -5, ds.labels * 1000), "sparse")
    net = feature_network_for(sparse, tmp_path, steps=1)
    assert net.config.num_classes == 3
    assert net.info["fingerprint"] == dataset_fingerprint(sparse)
