"""Memory budgets: a predicted overrun fails before allocating, a measured one after."""

import mlx.core as mx
import pytest

from engine.device.memory.limits import (
    MemoryBudgetExceeded,
    check_budget,
    enforce_limit,
    release,
)


def test_over_budget_candidate_fails_fast_without_allocating(attention, make_config):
    config = make_config(attention, batch_size=256)
    release()
    before = mx.get_active_memory()
    with pytest.raises(MemoryBudgetExceeded, match=r"predicted \d+ MB exceeds the budget of 50 MB"):
        check_budget(config, 50)
    ran = []
    with pytest.raises(MemoryBudgetExceeded) as info, enforce_limit(50, config=config):
        ran.append(True)
    assert not ran and info.value.needed_mb > info.value.budget_mb == 50
    assert isinstance(info.value, ValueError)  # trial runners treat it as infeasible input
    assert mx.get_peak_memory() < before + 2**20  # nothing was built or run


def test_measured_overrun_is_reported_and_the_process_carries_on():
    limit = mx.get_memory_limit()
    # MLX's limit is advisory: the check after the block catches the 16 MB run.
    with pytest.raises(MemoryBudgetExceeded, match="measured"), enforce_limit(4):
        mx.eval(mx.ones((4, 1024, 1024)))
    assert mx.get_memory_limit() == limit
    with enforce_limit(64):
        mx.eval(mx.ones((1024, 1024)))


def test_release_empties_the_cache():
    mx.eval(mx.ones((1024, 1024)) * 2)
    mx.synchronize()
    assert mx.get_cache_memory() > 0
    release()
    assert mx.get_cache_memory() == 0
