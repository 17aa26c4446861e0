"""Adaptation triggers (grow on a plateau above the target, shrink over the latency budget)
and the neighbour each one picks: inside the space, the right way, weights carried over."""

import mlx.core as mx
import numpy as np
import pytest

from engine.model import morph
from engine.model.cost import param_count
from engine.model.unet import UNet
from search.hooks import adapt
from search.space import parse_space
from search.space_settings import AdaptSettings
from search.space_toml import SpaceError

FALLING = [(5, 1.0), (10, 0.5)]  # -50% over the last point
FLAT = [(5, 0.50), (10, 0.495), (15, 0.494)]  # -1% over one point, -1.2% over two
NONE = list  # no peers


def test_shrink_fires_over_the_latency_budget_only():
    s = AdaptSettings(shrink_above_ms=10.0)
    fired = adapt.trigger(s, FALLING, 12.0, NONE, depth=0)
    assert fired == adapt.Trigger("shrink", "latency 12 ms is over the 10 ms budget")
    assert adapt.trigger(s, FALLING, 10.0, NONE, depth=0) is None
    assert adapt.trigger(s, FALLING, None, NONE, depth=0) is None  # not measured
    assert adapt.trigger(s, FALLING, 12.0, NONE, depth=s.max_depth) is None  # lineage capped


def test_grow_fires_on_a_plateau_above_the_target():
    s = AdaptSettings(grow=True, plateau=0.02, patience=2, target_loss=0.3)
    fired = adapt.trigger(s, FLAT, None, NONE, depth=0)
    assert fired is not None and fired.kind == "grow"
    assert "0.494 plateaued (-1.2% over the last 2 points to step 15) above 0.3" in fired.reason
    assert adapt.trigger(s, FALLING + [(15, 0.3)], None, NONE, 0) is None  # still falling
    assert adapt.trigger(s, FLAT[:2], None, NONE, 0) is None  # too few points to judge
    below = AdaptSettings(grow=True, plateau=0.02, patience=2, target_loss=0.6)
    assert adapt.trigger(below, FLAT, None, NONE, 0) is None  # plateaued, but good enough
    assert adapt.trigger(AdaptSettings(plateau=0.02, target_loss=0.3), FLAT, None, NONE, 0) is None


def test_the_default_grow_target_is_the_median_of_the_peers_at_that_step():
    s = AdaptSettings(grow=True, patience=2)
    assert adapt.trigger(s, FLAT, None, lambda: [0.4, 0.45], 0) is None  # too few peers to judge
    assert adapt.trigger(s, FLAT, None, lambda: [0.4, 0.45, 0.6], 0).kind == "grow"  # median 0.45
    assert adapt.trigger(s, FLAT, None, lambda: [0.4, 0.5, 0.6], 0) is None  # 0.494 < median 0.5


def test_shrink_is_judged_before_grow():
    s = AdaptSettings(grow=True, target_loss=0.0, shrink_above_ms=1.0)
    assert adapt.trigger(s, FLAT, 2.0, NONE, 0).kind == "shrink"
    assert adapt.trigger(s, FLAT, 0.5, NONE, 0).kind == "grow"


@pytest.mark.parametrize(("key", "value"), [("plateau", "-0.1"), ("patience", "0"),
                                            ("max_depth", "0"), ("shrink_above_ms", "0"),
                                            ("grwo", "true")])
def test_bad_adapt_settings_name_the_key(key, value):
    with pytest.raises(SpaceError, match=rf"^<space>:2: \[adapt\] .*{key}"):
        parse_space(f"[adapt]\n{key} = {value}\n")


SPACE = parse_space("""
[data]
image_size = 8

[unet]
base_width = { choice = [8, 16, 32] }
width_mults = { choice = [[1, 1], [1, 2], [2, 2]] }
num_res_blocks = { int = [1, 2] }
norm_groups = 4
time_emb_dim = 16
activation = { choice = ["relu", "silu"] }
""")
MIDDLE = {"unet.base_width": 16, "unet.width_mults": "[1, 2]", "unet.num_res_blocks": 1,
          "unet.activation": "silu"}


def test_grow_picks_a_bigger_neighbour_inside_the_space_that_keeps_the_function():
    parent = SPACE.decode(MIDDLE)
    choice = adapt.choose("grow", SPACE, MIDDLE, 1, latency_ms=10.0)
    child = SPACE.decode(choice.params)
    assert child == choice.config and param_count(child.unet) > param_count(parent.unet)
    changed = {k for k in MIDDLE if choice.params[k] != MIDDLE[k]}
    assert len(changed) == 1 and choice.change.startswith(changed.pop())
    assert choice.predicted_ms > 10.0  # bigger costs more, by the FLOPs ratio
    # widening and deepening keep the network's output: the child starts where it stopped
    mx.random.seed(0)
    params = UNet(parent.unet).parameters()
    inherited = morph.inherit(parent.unet, params, child.unet)
    x, t = mx.random.normal((2, 8, 8, 1)), mx.array([3, 500])
    before, after = UNet(parent.unet), UNet(child.unet)
    before.update(params)
    after.update(inherited)
    np.testing.assert_allclose(np.array(after(x, t)), np.array(before(x, t)), atol=1e-5)


def test_grow_takes_the_cheapest_growth():
    costs = {}

    def cost(config):  # a device where depth is cheap and width is dear
        costs[config.unet] = 1.0 + config.unet.num_res_blocks + 10.0 * sum(config.unet.widths)
        return costs[config.unet]

    choice = adapt.choose("grow", SPACE, MIDDLE, 1, latency_ms=10.0, cost=cost)
    assert choice.change == "unet.num_res_blocks 1 -> 2"
    base = cost(SPACE.decode(MIDDLE))
    assert choice.predicted_ms == pytest.approx(10.0 * costs[choice.config.unet] / base)
    assert choice.predicted_ms == min(10.0 * c / base for u, c in costs.items()
                                      if param_count(u) > param_count(SPACE.decode(MIDDLE).unet))


def test_shrink_takes_the_largest_neighbour_that_fits_the_budget():
    parent = SPACE.decode(MIDDLE)
    loose = adapt.choose("shrink", SPACE, MIDDLE, 1, latency_ms=10.0, budget_ms=9.99)
    tight = adapt.choose("shrink", SPACE, MIDDLE, 1, latency_ms=10.0, budget_ms=0.01)
    for c in (loose, tight):
        assert param_count(c.config.unet) < param_count(parent.unet)
        assert morph.reachable(parent.unet, c.config.unet)
    # nothing fits 0.01 ms: the smallest neighbour, which may shrink again later
    assert tight.predicted_ms < loose.predicted_ms <= 9.99
    fits = adapt.choose("shrink", SPACE, MIDDLE, 1, latency_ms=10.0,
                        budget_ms=tight.predicted_ms)
    assert fits.predicted_ms == tight.predicted_ms


def test_nothing_to_shrink_into_at_the_edge_of_the_space():
    smallest = {**MIDDLE, "unet.base_width": 8, "unet.width_mults": "[1, 1]"}
    assert adapt.choose("shrink", SPACE, smallest, 1, latency_ms=10.0) is None
