"""Sample-quality metrics on feature-network embeddings: FID, KID, precision and recall.

The metric functions are pure numpy on ``(N, D)`` feature arrays. :func:`evaluate_quality`
embeds images with a feature network and reports every number next to its real-vs-real
floor at the same sample count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "FeatureExtractor",
    "QualityRecord",
    "evaluate_quality",
    "fid",
    "frechet_distance",
    "kid",
    "precision_recall",
]

# Rows of a pairwise-distance block; bounds memory at ROW_CHUNK * N float64.
ROW_CHUNK = 1024


class FeatureExtractor(Protocol):
    """Anything that embeds NHWC images in [-1, 1] as ``(N, D)`` features."""

    def features(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class QualityRecord:
    """Quality of ``n`` generated images, with real-vs-real floors at the same ``n``."""

    fid: float
    kid: float
    precision: float
    recall: float
    n: int
    fid_floor: float
    kid_floor: float


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussians (Heusel et al. 2017).

    tr((S1 S2)^1/2) equals tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric PSD, so
    two symmetric eigendecompositions replace a general matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; rounding-negative eigenvalues count as 0."""
    eigvals, eigvecs = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets.

    Args:
        feats_a: ``(Na, D)`` features, Na >= 2.
        feats_b: ``(Nb, D)`` features, Nb >= 2.

    Returns:
        The FID (>= 0). It is biased upwards at small N; compare against a floor.

    Raises:
        ValueError: On mismatched dimensions, fewer than 2 rows, or non-finite features.
    """
    a, b = _check_pair(feats_a, feats_b, minimum=2)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance: unbiased MMD^2, kernel (x.y / D + 1)^3 (Binkowski et al. 2018).

    Args:
        feats_a: ``(Na, D)`` features.
        feats_b: ``(Nb, D)`` features.
        subsets: Number of random subset pairs averaged.
        subset_size: Rows per subset, capped at min(Na, Nb); drawn without replacement.
            When that covers both sets whole, one subset is computed.
        seed: Seed of the subset draws.

    Returns:
        The mean MMD^2 over subsets; about 0 (possibly negative) for equal distributions.

    Raises:
        ValueError: On mismatched dimensions, fewer than 2 rows, or non-finite features.
    """
    a, b = _check_pair(feats_a, feats_b, minimum=2)
    m = min(subset_size, len(a), len(b))
    if m == len(a) == len(b):
        subsets = 1  # every "subset" is the whole of both sets; MMD ignores order
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(
            a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(values))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate: diagonal terms of the within-set kernels are excluded."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls reaching each point's k-th nearest neighbour.

    Args:
        real: ``(Nr, D)`` real features, Nr > k.
        fake: ``(Nf, D)`` generated features, Nf > k.
        k: Neighbour rank defining the ball radii.

    Returns:
        ``(precision, recall)``: the fraction of fake points on the real manifold, and of
        real points on the fake manifold.

    Raises:
        ValueError: On mismatched dimensions, too few rows, or non-finite features.
    """
    r, f = _check_pair(real, fake, minimum=k + 1)
    precision = _coverage(f, r, _knn_radii(r, k))
    recall = _coverage(r, f, _knn_radii(f, k))
    return precision, recall


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(len(x), len(y))`` squared Euclidean distances, clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.clip(d, 0.0, None)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    radii = np.empty(len(x))
    for start in range(0, len(x), ROW_CHUNK):
        block = _sq_dists(x[start : start + ROW_CHUNK], x)
        # Column k of the partition, since column 0 is the point itself at distance 0.
        radii[start : start + ROW_CHUNK] = np.partition(block, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` inside at least one ball ``(centres[j], radii[j])``."""
    inside = 0
    for start in range(0, len(points), ROW_CHUNK):
        block = _sq_dists(points[start : start + ROW_CHUNK], centres)
        inside += int((block <= radii[None, :]).any(axis=1).sum())
    return inside / len(points)


def _check_pair(a: np.ndarray, b: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < minimum or len(b) < minimum:
        raise ValueError(f"need at least {minimum} rows per set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinity")
    return a, b


def check_real_count(n: int, available: int, what: str) -> None:
    """Refuse an evaluation of ``n`` samples against ``available`` real images before any
    training: :func:`evaluate_quality` draws two disjoint real sets of ``n``.

    Args:
        n: the sample count.
        available: the real images there are.
        what: what names ``n`` to the user, e.g. ``[evaluate] fid_samples``.

    Raises:
        ValueError: ``available < 2 * n``, naming both numbers.
    """
    if available < 2 * n:
        raise ValueError(f"{what} = {n} needs {2 * n} real images (two disjoint sets of {n}: "
                         f"the scores and the real-vs-real floor), but the dataset has "
                         f"{available}: lower {what} to at most {available // 2}")


def evaluate_quality(
    generated: np.ndarray,
    real: np.ndarray,
    feature_net: FeatureExtractor,
    n: int,
    seed: int = 0,
) -> QualityRecord:
    """Score ``n`` generated images against ``n`` real ones, with a real-vs-real floor.

    Two disjoint random real subsets A and B of size ``n`` are drawn: generated-vs-A gives
    the scores, B-vs-A the floors, so both carry the same small-sample bias.

    Args:
        generated: ``(>= n, H, W, C)`` images in [-1, 1]; a random ``n`` are scored.
        real: ``(>= 2n, H, W, C)`` real images in [-1, 1].
        feature_net: Embeds images (for example a :class:`engine.quality.features.FeatureNetwork`).
        n: Sample count for every metric, >= 4.
        seed: Seed of the subset draws and of KID's subsets.

    Returns:
        The :class:`QualityRecord`.

    Raises:
        ValueError: If there are too few images, shapes differ, or ``generated`` holds NaN
            or infinity (a diverged model).
    """
    if n < 4:
        raise ValueError(f"n must be >= 4, got {n}")
    if len(real) < 2 * n or len(generated) < n:  # check_real_count says it before training
        raise ValueError(
            f"need >= {2 * n} real and >= {n} generated images, got {len(real)} and {len(generated)}"
        )
    if generated.shape[1:] != real.shape[1:]:
        raise ValueError(
            f"generated {generated.shape[1:]} and real {real.shape[1:]} image shapes differ"
        )
    if not np.isfinite(generated).all():
        raise ValueError("generated images contain NaN or infinity")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    real_a, real_b = real[order[:n]], real[order[n : 2 * n]]
    fake = np.clip(generated[rng.choice(len(generated), n, replace=False)], -1.0, 1.0)
    f_a, f_b, f_fake = (feature_net.features(x) for x in (real_a, real_b, fake))
    precision, recall = precision_recall(f_a, f_fake)
    return QualityRecord(
        fid=fid(f_fake, f_a),
        kid=kid(f_fake, f_a, seed=seed),
        precision=precision,
        recall=recall,
        n=n,
        fid_floor=fid(f_b, f_a),
        kid_floor=kid(f_b, f_a, seed=seed),
    )
