"""Pareto routines against independent brute-force oracles."""

import itertools

import numpy as np
import pytest

from search.pareto import (
    crowding_distance,
    default_reference,
    dominates,
    hypervolume,
    hypervolume_contributions,
    non_dominated_sort,
    pareto_mask,
    to_minimize,
)


def brute_ranks(points):
    """Peel fronts by checking every pair: the textbook definition."""
    remaining, ranks, rank = set(range(len(points))), np.full(len(points), -1), 0
    while remaining:
        front = {i for i in remaining
                 if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def hv_inclusion_exclusion(points, ref):
    """Exact hypervolume: union of boxes [p, ref] by inclusion-exclusion."""
    pts = [p for p in points if np.all(p < ref)]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(pts, k):
            corner = np.max(subset, axis=0)
            total += (-1) ** (k + 1) * np.prod(ref - corner)
    return total


def hv_grid(points, ref):
    """Exact hypervolume of integer points: count the dominated unit cells."""
    cells = itertools.product(*(range(int(r)) for r in ref))
    return sum(any(np.all(p <= np.array(c)) for p in points) for c in cells)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("m", [2, 3, 4])
def test_sort_and_mask_match_brute_force(seed, m):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 5, size=(int(rng.integers(1, 25)), m)).astype(float)  # many ties
    ranks = non_dominated_sort(points)
    np.testing.assert_array_equal(ranks, brute_ranks(points))
    np.testing.assert_array_equal(pareto_mask(points), ranks == 0)


@pytest.mark.parametrize("seed", range(15))
def test_hypervolume_3d_matches_inclusion_exclusion(seed):
    rng = np.random.default_rng(seed)
    points = rng.random((int(rng.integers(1, 9)), 3))
    ref = np.array([1.1, 1.2, 1.0])
    assert hypervolume(points, ref) == pytest.approx(hv_inclusion_exclusion(points, ref))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("m", [2, 3])
def test_hypervolume_matches_cell_count(seed, m):
    rng = np.random.default_rng(100 + seed)
    points = rng.integers(0, 6, size=(int(rng.integers(1, 15)), m)).astype(float)
    ref = np.full(m, 6.0)
    assert hypervolume(points, ref) == pytest.approx(hv_grid(points, ref))


def test_hypervolume_exact_small_cases():
    assert hypervolume(np.array([[1.0, 2.0, 3.0]]), [2, 4, 6]) == pytest.approx(1 * 2 * 3)
    # Two boxes overlapping in [1,2]x[1,2]: 2*1 + 1*2 - 1*1.
    assert hypervolume(np.array([[0.0, 1.0], [1.0, 0.0]]), [2, 2]) == pytest.approx(3.0)
    assert hypervolume(np.array([[3.0, 0.0, 0.0]]), [2, 2, 2]) == 0.0  # beyond the reference
    assert hypervolume(np.zeros((0, 3)), [1, 1, 1]) == 0.0


def test_hypervolume_ignores_dominated_points():
    front = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    worse = front + 0.5
    ref = [2, 2, 2]
    assert hypervolume(np.vstack([front, worse]), ref) == pytest.approx(hypervolume(front, ref))


def test_contributions_and_crowding():
    pts = np.array([[0.0, 3.0], [1.0, 1.0], [3.0, 0.0]])
    contrib = hypervolume_contributions(pts, [4, 4])
    assert contrib == pytest.approx([1 * 1, 2 * 2, 1 * 1])
    crowd = crowding_distance(pts)
    assert np.isinf(crowd[0]) and np.isinf(crowd[2]) and crowd[1] == pytest.approx(2.0)


def test_to_minimize_and_reference():
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(to_minimize(values, [False, True]), [[1, -2], [3, -4]])
    assert np.all(default_reference(values) > values.max(axis=0))
