"""MO-ASHA's one-rung-ahead rule on synthetic vectors: a trial outside the top ceil(n/eta)
is pruned only if it is still dominated with its proxy advanced by the rung gain (the
median proxy ratio between two consecutive rungs). Oracles are written from the
definitions; the ranking itself is checked against brute force in test_pruning.py."""

import math
import statistics

import numpy as np
import pytest

from search.pruning.base import Cost
from search.pruning.mo_asha import MoAshaPruner, ahead, judge, rank_order, rung_gain, survivors
from search.pruning.registry import make_pruner
from search.space import load_space, parse_space
from workers.records import Measurement, RungReport


def brute_dominates(a, b):
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def brute_proceeds(points, eta, gain):
    """Top ceil(n/eta) by rank, or no other point dominates (proxy * gain, costs) where
    that is no worse than the point itself."""
    n = len(points)
    position = {int(i): p for p, i in enumerate(rank_order(np.array(points, float)))}
    keep = math.ceil(n / eta)
    out = []
    for i, p in enumerate(points):
        moved = min(p[0] * gain, p[0])
        advanced = [moved, *p[1:]]
        beaten = any(brute_dominates(points[j], advanced) for j in range(n) if j != i)
        out.append(position[i] < keep or not beaten)
    return out


@pytest.mark.parametrize("seed", range(10))
def test_one_rung_ahead_decisions_agree_with_brute_force(seed):
    rng = np.random.default_rng(300 + seed)
    n, eta = int(rng.integers(2, 25)), int(rng.integers(2, 5))
    gain = float(rng.choice([1.0, 0.9, 0.7, 0.5, 1.3]))  # 1.3: a worsening "gain", ignored
    points = rng.integers(1, 8, (n, 3)).astype(float) if seed % 2 else rng.random((n, 3)) + 0.1
    expected = brute_proceeds(points.tolist(), eta, gain)
    assert [judge(points, i, eta, gain=gain).proceed for i in range(n)] == expected
    assert survivors(points, eta, gain=gain).tolist() == expected


@pytest.mark.parametrize("seed", range(6))
def test_one_rung_ahead_keeps_a_superset_of_plain_mo_asha(seed):
    rng = np.random.default_rng(400 + seed)
    points = rng.random((int(rng.integers(3, 30)), 3)) + 0.05
    plain = survivors(points, 3)
    fronts_zero = np.array([not any(brute_dominates(q, p) for q in points.tolist())
                            for p in points.tolist()])
    assert (plain >= fronts_zero).all()  # the non-dominated always continue
    kept = [survivors(points, 3, gain=g) for g in (1.0, 0.9, 0.7, 0.4)]
    assert (kept[0] == plain).all()  # gain 1 is plain MO-ASHA
    for looser, stricter in zip(kept[1:], kept):
        assert (looser >= stricter).all()  # a larger step ahead prunes a subset


def test_the_gain_decides_a_close_call_and_not_a_clear_one():
    #                 proxy lat  mem
    points = np.array([[0.60, 5.0, 0.3],   # 0: cheap, best proxy
                       [0.64, 9.0, 0.9],   # 1: costlier, proxy 7% behind
                       [1.10, 9.0, 0.9],   # 2: costlier, proxy 83% behind
                       [0.61, 4.0, 0.2]])  # 3: cheapest (fills the top ceil(4/4) = 1)
    plain = [judge(points, i, eta=4).proceed for i in range(4)]
    assert plain == [True, False, False, True]
    one_rung = [judge(points, i, eta=4, gain=0.7) for i in range(4)]
    assert [v.proceed for v in one_rung] == [True, True, False, True]
    assert one_rung[1].dominated_by == (0, 3) and one_rung[1].ahead_by == ()
    assert one_rung[2].ahead_by == (0, 1, 3)  # 1 beats 1.10 * 0.7 = 0.77 at equal costs


def test_ahead_never_makes_a_point_worse():
    assert ahead(np.array([2.0, 1.0]), 0.5).tolist() == [1.0, 1.0]
    assert ahead(np.array([2.0, 1.0]), 1.5).tolist() == [2.0, 1.0]  # a worsening gain
    assert ahead(np.array([-2.0, 1.0]), 1.5).tolist() == [-3.0, 1.0]  # a maximised proxy
    assert ahead(np.array([-2.0, 1.0]), 0.5).tolist() == [-2.0, 1.0]


@pytest.mark.parametrize("seed", range(6))
def test_rung_gain_is_the_median_ratio_of_the_trials_at_both_rungs(seed):
    rng = np.random.default_rng(500 + seed)
    current = {int(n): float(v) for n, v in zip(rng.choice(40, 15, replace=False),
                                                rng.random(15) + 0.2)}
    following = {int(n): float(v) for n, v in zip(rng.choice(40, 8, replace=False),
                                                   rng.random(8) + 0.1)}
    both = [n for n in following if n in current]
    expected = statistics.median(following[n] / current[n] for n in both) if both else 1.0
    assert rung_gain(current, following) == pytest.approx(expected)


def test_rung_gain_means_nothing_without_one_sign_or_overlap():
    assert rung_gain({1: 0.5}, {2: 0.4}) == 1.0  # no trial at both rungs
    assert rung_gain({1: 0.5, 2: -0.1}, {1: 0.4, 2: 0.2}) == 1.0  # mixed signs
    assert rung_gain({1: 0.0}, {1: 0.4}) == 1.0
    assert rung_gain({1: -0.5, 2: -0.4}, {1: -0.6, 2: -0.6}) == pytest.approx(1.35)


# -- the pruner ----------------------------------------------------------------------------


def _space():
    return parse_space(load_space("smoke").source)


def _measurement(latency, memory):
    return Measurement(latency, 0.01, (latency,) * 5, train_mb=memory, sample_mb=memory,
                       seconds=0.1)


def _arrive(pruner, number, proxies, latency, memory, total=90):
    """A trial reports ``proxies`` ({step: value}) in order; the last decision."""
    assert pruner.prescreen(number, Cost(1000, 10_000, total)).proceed
    m = _measurement(latency, memory)
    decision = pruner.on_measured(number, m)
    for step, proxy in proxies.items():
        decision = pruner.on_rung(number, RungReport(step, proxy, proxy, 1.0), m)
        if not decision.proceed:
            break
    return decision


def test_pruner_learns_the_gain_from_trials_that_reached_the_next_rung():
    early, late = make_pruner("mo-asha", _space()), make_pruner("mo-asha", _space())
    for p in (early, late):
        _arrive(p, 0, {10: 0.60}, 5.0, 0.3)
    _arrive(late, 9, {10: 1.00, 30: 0.70}, 3.0, 0.2)  # one trial at both rungs: gain 0.7
    assert early.gain(10) == 1.0 and late.gain(10) == pytest.approx(0.7)
    # 7% behind trial 0 and costlier: plain dominance prunes it, one rung ahead does not
    close_early = _arrive(early, 1, {10: 0.64}, 9.0, 0.9)
    assert not close_early.proceed and "dominated by trial 0);" in close_early.reason
    close_late = _arrive(late, 1, {10: 0.64}, 9.0, 0.9)
    assert close_late.proceed
    assert "dominated by trial 0), but not with its proxy one rung ahead (x0.7)" in (
        close_late.reason)
    clear = _arrive(late, 2, {10: 1.10}, 9.0, 0.9)  # 83% behind: pruned either way
    assert not clear.proceed
    assert "(front 2, dominated by trial 0, 1) even with its proxy one rung ahead (x0.7)" in (
        clear.reason)


def test_pruner_with_a_maximised_proxy_moves_it_up():
    pruner = MoAshaPruner(_space(), directions=("maximize", "minimize", "minimize"))
    _arrive(pruner, 0, {10: 0.50, 30: 0.60}, 3.0, 0.2)  # accuracy-like: gain 1.2
    _arrive(pruner, 1, {10: 0.60}, 5.0, 0.3)
    assert pruner.gain(10) == pytest.approx(1.2)
    assert _arrive(pruner, 2, {10: 0.55}, 9.0, 0.9).proceed  # 0.55 * 1.2 > 0.60
    assert not _arrive(pruner, 3, {10: 0.40}, 9.0, 0.9).proceed  # 0.40 * 1.2 < 0.60


def test_a_restored_pruner_has_the_same_gain_and_answers(stored_trials):
    rng = np.random.default_rng(9)
    live, events = make_pruner("mo-asha", _space()), []
    for number in range(15):
        latency, memory, proxy = (float(x) + 0.1 for x in rng.random(3))
        proxies = {10: proxy, 30: proxy * float(rng.uniform(0.6, 0.8))} if number % 4 == 0 \
            else {10: proxy}
        _arrive(live, number, proxies, latency, memory)
        reported = {s: v for s, v in proxies.items() if number in live.proxies.get(s, {})}
        events.append((latency, memory, reported))  # what a pruned trial stored
    restored = make_pruner("mo-asha", _space())
    restored.restore(stored_trials([(l, m, p.items()) for l, m, p in events]))
    assert restored.gain(10) == live.gain(10) < 1.0
    answers = []
    for p in (live, restored):
        p.prescreen(15, Cost(1, 1, 90))
        answers.append(p.on_rung(15, RungReport(10, 0.9, 0.9, 1.0), _measurement(0.9, 0.9)))
    assert answers[0] == answers[1]


def test_the_plain_ablation_ignores_the_gain():
    plain = MoAshaPruner(_space(), one_rung_ahead=False)
    _arrive(plain, 0, {10: 0.60}, 5.0, 0.3)
    _arrive(plain, 9, {10: 1.00, 30: 0.70}, 3.0, 0.2)
    assert plain.gain(10) == 1.0
    assert not _arrive(plain, 1, {10: 0.64}, 9.0, 0.9).proceed  # one rung ahead keeps it
