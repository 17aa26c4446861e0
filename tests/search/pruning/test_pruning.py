"""Pruners on synthetic vectors: MO-ASHA's ranking against brute force, its rule, the
constraint stages, mixed directions, and a restored history that ranks like the live one."""

import argparse
import functools
import itertools
import math

import numpy as np
import pytest

from search.cli.study import register
from search.pruning.base import ConstraintPruner, Cost, constraint_values
from search.pruning.mo_asha import MoAshaPruner, judge, keep_count, rank_order, survivors
from search.pruning.registry import PRUNERS, make_pruner
from search.space import load_space, parse_space
from workers.records import Measurement, RungReport

# -- brute-force oracles, written from the definitions and never from search.pareto -------


def brute_dominates(a, b, maximize):
    """``a`` is no worse than ``b`` in every objective (in its own direction), better in one."""
    no_worse = all((x >= y) if up else (x <= y) for x, y, up in zip(a, b, maximize))
    better = any((x > y) if up else (x < y) for x, y, up in zip(a, b, maximize))
    return no_worse and better


def brute_fronts(points, maximize):
    """Front index = length of the longest chain of dominators above a point."""
    n = len(points)

    @functools.cache
    def depth(i):
        above = [j for j in range(n) if brute_dominates(points[j], points[i], maximize)]
        return 1 + max(map(depth, above)) if above else 0

    return [depth(i) for i in range(n)]


def brute_crowding(front):
    """Deb et al. 2002: per objective, boundary points infinite, inner ones the normalised
    gap between their neighbours; summed over objectives (in objective order)."""
    n, m = len(front), len(front[0])
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(m):
        order = sorted(range(n), key=lambda i: (front[i][k], i))
        span = front[order[-1]][k] - front[order[0]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        for a, b, c in zip(order, order[1:], order[2:]):
            if span > 0:
                dist[b] += (front[c][k] - front[a][k]) / span
    return dist


def brute_hv(points, ref):
    """Union of boxes [p, ref] by inclusion-exclusion (minimised points)."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref))]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(pts, k):
            corner = np.max(subset, axis=0)
            total += (-1) ** (k + 1) * float(np.prod(np.asarray(ref) - corner))
    return total


def brute_order(points, tiebreak="crowding", maximize=(False, False, False)):
    fronts = brute_fronts(points, maximize)
    signs = [-1.0 if up else 1.0 for up in maximize]
    mins = [[s * x for s, x in zip(signs, p)] for p in points]
    worst = np.max(mins, axis=0)
    ref = worst + 0.1 * np.maximum(np.abs(worst), 1e-12)
    spread = [0.0] * len(points)
    for f in set(fronts):
        members = [i for i in range(len(points)) if fronts[i] == f]
        front = [mins[i] for i in members]
        if tiebreak == "crowding":
            values = brute_crowding(front)
        else:
            full = brute_hv(front, ref)
            values = [full - brute_hv(front[:j] + front[j + 1:], ref) for j in range(len(front))]
        for i, v in zip(members, values):
            spread[i] = v
    return sorted(range(len(points)), key=lambda i: (fronts[i], -spread[i], i)), fronts


def brute_proceeds(points, eta, maximize=(False, False, False)):
    order, fronts = brute_order(points, maximize=maximize)
    keep = math.ceil(len(points) / eta)
    return [fronts[i] == 0 or order.index(i) < keep for i in range(len(points))]


def _signs(maximize):
    return np.where(np.asarray(maximize), -1.0, 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_rank_order_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    # integers: duplicates, ties and shared coordinates; floats: the general case
    points = rng.integers(0, 5, (n, 3)).astype(float) if seed % 2 else rng.random((n, 3))
    expected, _ = brute_order(points.tolist())
    assert rank_order(points).tolist() == expected


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_tiebreak_agrees_with_brute_force(seed):
    points = np.random.default_rng(100 + seed).random((9, 3))
    expected, _ = brute_order(points.tolist(), tiebreak="hypervolume")
    assert rank_order(points, "hypervolume").tolist() == expected


@pytest.mark.parametrize("seed", range(8))
def test_decisions_agree_with_brute_force_for_every_point(seed):
    rng = np.random.default_rng(200 + seed)
    n, eta = int(rng.integers(2, 25)), int(rng.integers(2, 5))
    points = rng.integers(0, 6, (n, 3)).astype(float)
    expected = brute_proceeds(points.tolist(), eta)
    assert [judge(points, i, eta).proceed for i in range(n)] == expected
    assert survivors(points, eta).tolist() == expected


def test_dominated_pruned_and_non_dominated_kept():
    #                 proxy lat  mem
    points = np.array([[0.5, 10.0, 5.0],   # 0: non-dominated
                       [0.6, 20.0, 6.0],   # 1: dominated by 0
                       [0.9, 5.0, 9.0],    # 2: non-dominated (fastest), yet last by crowding
                       [0.7, 25.0, 7.0]])  # 3: dominated by 0 and 1
    verdicts = [judge(points, i, eta=4) for i in range(4)]
    assert [v.front for v in verdicts] == [0, 1, 0, 2]
    assert [v.proceed for v in verdicts] == [True, False, True, False]
    assert verdicts[2].position == 1 >= verdicts[2].keep == 1  # kept: non-dominated
    assert verdicts[3].dominated_by == (0, 1)


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_the_top_one_over_eta_continue(eta):
    chain = np.repeat(np.arange(27.0)[:, None], 3, axis=1)  # each point dominates the next
    kept = survivors(chain, eta)
    assert kept.sum() == math.ceil(27 / eta) and kept[: math.ceil(27 / eta)].all()
    rng = np.random.default_rng(eta)
    for _ in range(20):
        points = rng.random((int(rng.integers(1, 40)), 3))
        front = int((np.asarray(brute_fronts(points.tolist(), (False,) * 3)) == 0).sum())
        assert survivors(points, eta).sum() == max(front, keep_count(len(points), eta))


def test_mixed_directions_match_brute_force_in_original_units():
    maximize = (True, False, False)  # e.g. an accuracy-like proxy
    rng = np.random.default_rng(7)
    for _ in range(10):
        points = rng.integers(0, 5, (int(rng.integers(2, 20)), 3)).astype(float)
        expected = brute_proceeds(points.tolist(), 3, maximize)
        assert survivors(points * _signs(maximize), 3).tolist() == expected


# -- the pruner ----------------------------------------------------------------------------


def _space(extra="", rungs="min_steps = 10\neta = 3"):
    source = load_space("smoke").source.replace("min_steps = 10\neta = 3", rungs)
    return parse_space(source + extra)


def _measurement(latency, memory):
    return Measurement(latency, 0.01, (latency,) * 5, train_mb=memory, sample_mb=memory,
                       seconds=0.1)


def _arrive(pruner, number, proxy, latency, memory, steps=(10,), total=90):
    """One trial through every stage; returns the decision at its last rung."""
    assert pruner.prescreen(number, Cost(1000, 10_000, total)).proceed
    m = _measurement(latency, memory)
    decision = pruner.on_measured(number, m)
    for step in steps:
        decision = pruner.on_rung(number, RungReport(step, proxy, proxy, 1.0), m)
        if not decision.proceed:
            break
    return decision


def test_pruner_prunes_a_dominated_trial_and_says_why():
    pruner = make_pruner("mo-asha", _space())
    assert _arrive(pruner, 0, 0.5, 10.0, 5.0).proceed  # alone at the rung
    decision = _arrive(pruner, 1, 0.6, 20.0, 6.0)
    assert not decision.proceed
    assert "2 of 2 (front 1, dominated by trial 0)" in decision.reason
    assert "top 1 = ceil(2/3)" in decision.reason
    fast = _arrive(pruner, 2, 0.9, 5.0, 9.0)  # third of 3 by crowding, but non-dominated
    assert fast.proceed and "non-dominated" in fast.reason


def test_pruner_is_asynchronous_and_keeps_a_third_of_a_chain_fed_best_first():
    pruner = make_pruner("mo-asha", _space())
    decisions = [_arrive(pruner, i, 0.1 * (i + 1), 10.0 + i, 5.0 + i) for i in range(9)]
    assert [d.proceed for d in decisions] == [True] + [False] * 8
    worst_first = make_pruner("mo-asha", _space())
    assert all(_arrive(worst_first, i, 1.0 - 0.1 * i, 20.0 - i, 9.0 - i).proceed
               for i in range(9))  # each newcomer dominates everyone before it


def test_the_last_rung_never_prunes():
    pruner = make_pruner("mo-asha", _space())
    _arrive(pruner, 0, 0.5, 10.0, 5.0, steps=(10, 30), total=30)
    last = _arrive(pruner, 1, 0.9, 20.0, 9.0, steps=(30,), total=30)
    assert last.proceed and "last rung" in last.reason
    unknown = make_pruner("mo-asha", _space())  # total unknown: 45 is off the 10*3^k ladder
    _arrive(unknown, 0, 0.5, 10.0, 5.0, steps=(45,), total=0)
    assert _arrive(unknown, 1, 0.9, 20.0, 9.0, steps=(45,), total=0).proceed
    _arrive(unknown, 2, 0.5, 10.0, 5.0, steps=(30,), total=0)
    assert not _arrive(unknown, 3, 0.9, 20.0, 9.0, steps=(30,), total=0).proceed


def test_pruner_with_a_maximised_proxy():
    pruner = MoAshaPruner(_space(), directions=("maximize", "minimize", "minimize"))
    _arrive(pruner, 0, 0.9, 10.0, 5.0)
    assert not _arrive(pruner, 1, 0.5, 20.0, 6.0).proceed  # less accurate and costlier
    assert _arrive(pruner, 2, 0.95, 20.0, 6.0).proceed  # costlier but more accurate
    with pytest.raises(ValueError, match="directions"):
        MoAshaPruner(_space(), directions=("up", "minimize", "minimize"))


def test_stage1_dominance_uses_the_best_proxy_seen():
    pruner = MoAshaPruner(_space(), prune_dominated=True)
    _arrive(pruner, 0, 0.5, 10.0, 5.0)
    assert pruner.on_measured(1, _measurement(8.0, 6.0)).proceed  # faster: may still win
    decision = pruner.on_measured(2, _measurement(12.0, 6.0))
    assert not decision.proceed and "dominated by trial 0" in decision.reason
    assert not make_pruner("mo-asha", _space()).prune_dominated  # off unless the space says
    switched = parse_space(_space().source.replace('pruner = "none"',
                                                   'pruner = "mo-asha"\nprune_dominated = true'))
    assert make_pruner(switched.study.pruner, switched).prune_dominated


def test_constraint_stages_record_value_over_limit_minus_one():
    space = _space("\n[constraints]\nmax_params = 1000\nmax_flops = 50000\n"
                   "max_latency_ms = 20\nmax_memory_mb = 8\n")
    pruner = ConstraintPruner(space)
    assert pruner.prescreen(0, Cost(1000, 50_000)).proceed  # at the limit is feasible
    over = pruner.prescreen(1, Cost(1500, 10_000))
    assert not over.proceed and "params 1,500 over the limit 1,000 (+50.0%)" in over.reason
    slow = pruner.on_measured(2, _measurement(30.0, 4.0))
    assert not slow.proceed and slow.reason.startswith("constraints stage 1: latency_ms 30")
    assert pruner.on_measured(3, _measurement(10.0, 4.0)).proceed
    assert pruner.on_rung(3, RungReport(10, 9.0, 9.0, 1.0), None).proceed
    assert constraint_values({"params": 1500.0, "latency_ms": 10.0},
                             {"params": 1000.0, "latency_ms": 20.0, "memory_mb": 8.0}
                             ) == {"params": 0.5, "latency_ms": -0.5}
    mo = make_pruner("mo-asha", space)  # mo-asha includes the constraint stages
    assert not mo.prescreen(4, Cost(1500, 10, 90)).proceed
    assert not mo.on_measured(5, _measurement(30.0, 4.0)).proceed


def test_the_cli_and_the_space_file_choose_the_pruner():
    parser = argparse.ArgumentParser(prog="diffnas")
    register(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["search", "--pruner", "mo-asha"]).pruner == "mo-asha"
    space = parse_space(_space().source.replace('pruner = "none"', 'pruner = "constraints"'))
    assert make_pruner(space.study.pruner, space).name == "constraints"


def test_registry_and_bad_spaces():
    assert {"none", "constraints", "mo-asha"} <= set(PRUNERS)
    with pytest.raises(ValueError, match="unknown pruner 'asha' .*none, constraints, mo-asha"):
        make_pruner("asha", _space())
    with pytest.raises(ValueError, match="min_steps > 0"):
        make_pruner("mo-asha", _space(rungs="min_steps = 0\neta = 3"))


def test_a_restored_history_ranks_exactly_like_the_live_one(stored_trials):
    rng = np.random.default_rng(3)
    live = make_pruner("mo-asha", _space())
    events = []
    for number in range(12):
        latency, memory, proxy = (float(x) for x in rng.random(3))
        steps = (10, 30) if number % 3 == 0 else (10,)
        _arrive(live, number, proxy, latency, memory, steps=steps)
        events.append((latency, memory, [(s, proxy) for s in steps]))
    restored = make_pruner("mo-asha", _space())
    restored.restore(stored_trials(events))
    for step in (10, 30):
        assert restored.table(step)[0] == live.table(step)[0]
        np.testing.assert_array_equal(restored.table(step)[1], live.table(step)[1])
    for p in (live, restored):  # the next trial gets the same answer from both
        p.prescreen(12, Cost(1, 1, 90))
    newcomer = [p.on_rung(12, RungReport(10, 0.5, 0.5, 1.0), _measurement(0.5, 0.5))
                for p in (live, restored)]
    assert newcomer[0] == newcomer[1]
