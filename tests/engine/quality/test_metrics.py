"""Tests for engine.quality.metrics against closed forms, brute force and real digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.data.datasets import Dataset, load_dataset
from engine.quality.features import DIGITS_HOLDOUT, FeatureNetwork, digits_feature_network
from engine.quality.metrics import (
    QualityRecord,
    check_real_count,
    evaluate_quality,
    fid,
    frechet_distance,
    kid,
    precision_recall,
)

N_EVAL = 500


def _random_psd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


# --- Frechet distance ------------------------------------------------------------------


def test_frechet_distance_closed_form_for_commuting_covariances() -> None:
    # Covariances diagonal in a shared rotated basis: FD = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    d = 6
    q = _random_rotation(rng, d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_general_eigenvalue_oracle() -> None:
    # Independent route: tr((S1 S2)^1/2) from the eigenvalues of the non-symmetric product.
    rng = np.random.default_rng(1)
    for d in (1, 2, 5, 16):
        s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * trace_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_fid_of_samples_approaches_population_value() -> None:
    rng = np.random.default_rng(2)
    d = 4
    s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
    mu2 = np.full(d, 0.5)
    x = rng.multivariate_normal(np.zeros(d), s1, size=40_000)
    y = rng.multivariate_normal(mu2, s2, size=40_000)
    assert fid(x, y) == pytest.approx(frechet_distance(np.zeros(d), s1, mu2, s2), rel=0.03)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="equal D"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid(np.full((5, 3), np.nan), np.zeros((5, 3)))


# --- KID -------------------------------------------------------------------------------


def _mmd2_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (u @ v / d + 1.0) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
    yy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    xy = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / m**2
    return xx + yy - 2 * xy


def test_kid_single_full_subset_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    assert kid(x, y, subsets=1, subset_size=12) == pytest.approx(_mmd2_brute_force(x, y), rel=1e-9)


def test_kid_is_unbiased_for_equal_distributions() -> None:
    rng = np.random.default_rng(4)
    same = [
        kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)), 10, 100, s)
        for s in range(30)
    ]
    shifted = kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 0.3, 10, 100)
    stderr = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * stderr
    assert min(same) < 0 < max(same)  # an unbiased estimate of 0 must go negative
    assert shifted > 10 * np.std(same)


# --- precision and recall --------------------------------------------------------------


def _pr_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(s: np.ndarray) -> np.ndarray:
        dist = np.linalg.norm(s[:, None] - s[None], axis=2)
        return np.sort(dist, axis=1)[:, k]

    def covered(points: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        hits = [any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points]
        return float(np.mean(hits))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((60, 3))
    fake = rng.standard_normal((50, 3)) * 0.7 + 1.5
    got = precision_recall(real, fake, k=3)
    assert got == pytest.approx(_pr_brute_force(real, fake, 3))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_extremes() -> None:
    rng = np.random.default_rng(6)
    real = rng.standard_normal((300, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    collapsed = real[:1] + 0.01 * rng.standard_normal((300, 4))  # mode collapse
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05


# --- evaluate_quality on real digits ----------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    """(train, held-out) digits at 16 px; the shipped network never saw the held-out part."""
    return load_dataset("digits", image_size=16).split(*DIGITS_HOLDOUT)


@pytest.fixture(scope="module")
def net() -> FeatureNetwork:
    return digits_feature_network()


def _noisy(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(images.shape).astype(np.float32)
    return np.clip(images + std * noise, -1.0, 1.0)


def test_held_out_digits_score_at_the_floor(
    digits: tuple[Dataset, Dataset], net: FeatureNetwork
) -> None:
    train, held = digits
    record = evaluate_quality(held.images, train.images, net, n=N_EVAL, seed=0)
    assert isinstance(record, QualityRecord) and record.n == N_EVAL
    assert record.fid_floor > 0
    assert abs(record.fid - record.fid_floor) < 0.25 * record.fid_floor
    assert abs(record.kid) < 5 * max(abs(record.kid_floor), 1e-3)
    assert record.precision > 0.8 and record.recall > 0.8


def test_fid_rises_with_noise(digits: tuple[Dataset, Dataset], net: FeatureNetwork) -> None:
    train, held = digits
    records = [
        evaluate_quality(_noisy(held.images, std, seed=1), train.images, net, n=N_EVAL, seed=0)
        for std in (0.0, 0.1, 0.2, 0.4, 0.8)
    ]
    fids = [r.fid for r in records]
    kids = [r.kid for r in records]
    assert fids == sorted(fids) and len(set(fids)) == len(fids), fids
    assert kids == sorted(kids), kids
    assert fids[1] > 1.2 * records[1].fid_floor  # even slight noise is visible


def test_pure_noise_scores_far_worse_than_real(
    digits: tuple[Dataset, Dataset], net: FeatureNetwork
) -> None:
    train, held = digits
    noise = np.random.default_rng(2).uniform(-1, 1, held.images.shape).astype(np.float32)
    real = evaluate_quality(held.images, train.images, net, n=N_EVAL, seed=0)
    fake = evaluate_quality(noise, train.images, net, n=N_EVAL, seed=0)
    assert fake.fid > 20 * real.fid
    assert fake.kid > 0.1 and fake.kid > 100 * abs(real.kid_floor)
    assert fake.precision < 0.25 and fake.recall < 0.05


def test_evaluate_quality_rejects_bad_input(
    digits: tuple[Dataset, Dataset], net: FeatureNetwork
) -> None:
    train, held = digits
    diverged = held.images.copy()
    diverged[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_quality(diverged, train.images, net, n=64)
    with pytest.raises(ValueError, match="real"):
        evaluate_quality(held.images, train.images[:100], net, n=64)
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_quality(held.images[:, :8, :8], train.images, net, n=64)


def test_check_real_count_refuses_exactly_what_evaluate_quality_would():
    check_real_count(8, 16, "n")  # two disjoint sets of 8
    with pytest.raises(ValueError, match=r"^fid_samples = 8 needs 16 real images.*has 15: "
                                         r"lower fid_samples to at most 7$"):
        check_real_count(8, 15, "fid_samples")
    images = np.zeros((15, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="need >= 16 real"):
        evaluate_quality(images[:8], images, lambda x: x.reshape(len(x), -1), 8)
