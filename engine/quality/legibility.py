"""Legibility: the share of generated images that a classifier reads as one of its classes.

An image counts as legible when the classifier is confident (top class probability at least
``threshold``) and, given a :class:`TypicalSet`, when its embedding also lies where real
images of that class lie. The second test is needed because softmax confidence alone is
not evidence of a digit: the shipped digits network gives pure Gaussian noise the class
"8" with probability above 0.9 (benchmarks/legibility.md measures it). The typical set
uses the Mahalanobis distance to class means under one shared covariance (Lee et al. 2018,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks"), on the same embedding that FID uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.quality.features import FeatureNetwork

__all__ = ["TypicalSet", "confident", "legibility", "legible", "typical_set"]

RIDGE = 1e-3  # relative to the mean feature variance: keeps the covariance invertible


@dataclass(frozen=True)
class TypicalSet:
    """Where real images of each class embed: class means, a shared precision, a radius.

    ``radius`` is the squared Mahalanobis distance to the predicted class's mean within
    which ``coverage`` of the real images used to fit it lie.
    """

    means: np.ndarray  # (K, D)
    precision: np.ndarray  # (D, D), inverse of the shared within-class covariance
    radius: float
    coverage: float

    def distances(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance ``(N,)`` of ``(N, D)`` features to their classes' means."""
        d = features - self.means[classes]
        return np.asarray(np.einsum("nd,de,ne->n", d, self.precision, d))


def typical_set(net: FeatureNetwork, images: np.ndarray, labels: np.ndarray,
                coverage: float = 0.99) -> TypicalSet:
    """Fit the typical set of labelled real images.

    Args:
        net: a classifier feature network.
        images: ``(N, H, W, C)`` real images in [-1, 1].
        labels: ``(N,)`` class indices in ``[0, num_classes)``, every class present.
        coverage: share of ``images`` that must fall inside the radius, in (0, 1].

    Returns:
        The fitted :class:`TypicalSet`.

    Raises:
        ValueError: on a coverage outside (0, 1], mismatched lengths, or a missing class.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    labels = np.asarray(labels, int)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    k = net.config.num_classes
    missing = sorted(set(range(k)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"typical set: no real image of class {missing[0]}")
    features = net.features(images)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(k)])
    centred = features - means[labels]
    cov = centred.T @ centred / len(features)
    cov += RIDGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    fitted = TypicalSet(means, np.linalg.inv(cov), 0.0, coverage)
    own = fitted.distances(features, net.probabilities(images).argmax(axis=1))
    return TypicalSet(means, fitted.precision, float(np.quantile(own, coverage)), coverage)


def confident(probabilities: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """``(N,)`` bool: the top class probability is at least ``threshold``."""
    return np.asarray(probabilities.max(axis=1) >= threshold)


def legible(images: np.ndarray, net: FeatureNetwork, typical: TypicalSet | None = None,
            threshold: float = 0.9) -> np.ndarray:
    """Which images the classifier reads confidently (and, given ``typical``, as typical).

    Args:
        images: ``(N, H, W, C)`` images in [-1, 1].
        net: the classifier, e.g. :func:`engine.quality.features.digits_feature_network`.
        typical: if given, an image must also lie inside its predicted class's radius.
        threshold: the least top class probability, in (0, 1].

    Returns:
        ``(N,)`` bool.

    Raises:
        ValueError: on a threshold outside (0, 1] or images the network cannot read.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    probs = net.probabilities(images)
    ok = confident(probs, threshold)
    if typical is not None:
        ok &= typical.distances(net.features(images), probs.argmax(axis=1)) <= typical.radius
    return ok


def legibility(images: np.ndarray, net: FeatureNetwork, typical: TypicalSet | None = None,
               threshold: float = 0.9) -> float:
    """The share of :func:`legible` images, in [0, 1] (arguments as there)."""
    return float(legible(images, net, typical, threshold).mean())
