"""Pareto logic as pure numpy: every objective is "lower is better" (convert at the edge).

``points`` is always an ``(n, m)`` float array: ``n`` candidates, ``m`` objectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_minimize(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Flip the sign of maximised objectives so that every column is lower-is-better."""
    signs = np.where(np.asarray(maximize, bool), -1.0, 1.0)
    return np.asarray(values, float) * signs


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere."""
    return bool(np.all(a <= b) and np.any(a < b))


def _domination_matrix(points: np.ndarray) -> np.ndarray:
    """``d[i, j]``: point i dominates point j. (n, n) bool."""
    le = np.all(points[:, None, :] <= points[None, :, :], axis=2)
    lt = np.any(points[:, None, :] < points[None, :, :], axis=2)
    return le & lt


def non_dominated_sort(points: np.ndarray) -> np.ndarray:
    """Front index of every point: 0 for the Pareto front, 1 for the next, ... (Deb et al. 2002).

    Returns:
        ``(n,)`` int array of ranks.
    """
    points = np.asarray(points, float)
    n = len(points)
    ranks = np.full(n, -1, int)
    if n == 0:
        return ranks
    dom = _domination_matrix(points)
    dominated_by = dom.sum(axis=0)  # how many unranked points dominate each point
    rank = 0
    current = np.flatnonzero(dominated_by == 0)
    while current.size:
        ranks[current] = rank
        dominated_by = dominated_by - dom[current].sum(axis=0)
        dominated_by[ranks >= 0] = -1
        current = np.flatnonzero(dominated_by == 0)
        rank += 1
    return ranks


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: the points no other point dominates (duplicates are all kept)."""
    points = np.asarray(points, float)
    if len(points) == 0:
        return np.zeros(0, bool)
    return np.asarray(~_domination_matrix(points).any(axis=0), bool)


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (While et al. 2006, HSO).

    Points not strictly better than the reference in every objective add nothing.
    """
    ref = np.asarray(reference, float)
    pts = np.asarray(points, float).reshape(-1, len(ref))
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return _hso(pts[pareto_mask(pts)], ref)


def _hso(pts: np.ndarray, ref: np.ndarray) -> float:
    """Slice along the last objective; each slab is a hypervolume one dimension lower."""
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    if pts.shape[1] == 2:
        return _hv2d(pts, ref)
    order = np.argsort(pts[:, -1], kind="stable")
    pts = pts[order]
    total = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        depth = upper - pts[i, -1]
        if depth > 0:
            slab = pts[: i + 1, :-1]
            total += depth * _hso(slab[pareto_mask(slab)], ref[:-1])
    return total


def _hv2d(pts: np.ndarray, ref: np.ndarray) -> float:
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    total, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            total += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(total)


def hypervolume_contributions(points: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    """``(n,)``: how much hypervolume is lost when each point is removed alone."""
    pts = np.asarray(points, float)
    full = hypervolume(pts, reference)
    return np.array([full - hypervolume(np.delete(pts, i, axis=0), reference)
                     for i in range(len(pts))])


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """Crowding distance within one front (Deb et al. 2002); extremes get ``inf``."""
    pts = np.asarray(points, float)
    n, m = pts.shape
    out = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(pts[:, k], kind="stable")
        span = pts[order[-1], k] - pts[order[0], k]
        out[order[0]] = out[order[-1]] = np.inf
        if span > 0:
            out[order[1:-1]] += (pts[order[2:], k] - pts[order[:-2], k]) / span
    return out


def default_reference(points: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """A reference point just worse than the worst value of each objective."""
    pts = np.asarray(points, float)
    worst = pts.max(axis=0)
    return worst + margin * np.maximum(np.abs(worst), 1e-12)
