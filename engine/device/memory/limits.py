"""Memory budgets enforced on a run: rejected before it starts when predicted over,
checked after each phase when measured over.

MLX's ``mx.set_memory_limit`` is advisory (on the CPU it lowers the peak by making the
main thread wait for queued ops; it never raises), so the measured peak is checked too.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from engine.config import Config
from engine.device.memory.model import MB, MemoryProfile, predict
from engine.device.peers import one_process


class MemoryBudgetExceeded(ValueError):
    """A candidate needs more memory than its budget: the trial is infeasible."""

    def __init__(self, what: str, needed_mb: float, budget_mb: float, source: str):
        super().__init__(f"{what} {source} {needed_mb:.0f} MB exceeds the budget of "
                         f"{budget_mb:.0f} MB")
        self.what, self.needed_mb, self.budget_mb, self.source = what, needed_mb, budget_mb, source


def check_budget(config: Config, budget_mb: float, batch: int | None = None) -> MemoryProfile:
    """Fail fast, before any allocation, when the predicted training peak is over budget.

    Raises:
        MemoryBudgetExceeded: naming the predicted peak and the budget.
    """
    profile = predict(config, batch)
    if profile.train_step_mb > budget_mb:
        raise MemoryBudgetExceeded(f"training at batch {profile.batch}", profile.train_step_mb,
                                   budget_mb, "predicted")
    if profile.validation_mb > budget_mb:
        raise MemoryBudgetExceeded(f"validation at batch {profile.val_batch}",
                                   profile.validation_mb, budget_mb, "predicted")
    return profile


@contextmanager
def enforce_limit(limit_mb: float, config: Config | None = None, batch: int | None = None,
                  cache_limit_mb: float | None = None) -> Iterator[None]:
    """Run a block under a memory budget.

    Before: if ``config`` is given, :func:`check_budget` rejects it without running. During:
    ``mx.set_memory_limit`` makes MLX wait for queued ops to retire instead of allocating
    past the limit (on the CPU it lowers the peak; it never raises). After: the measured
    ``mx.get_peak_memory`` is checked against the limit, because the limit is advisory.
    The previous limits are restored in every case.

    Raises:
        MemoryBudgetExceeded: predicted (before) or measured (after) over ``limit_mb``.
    """
    if config is not None:
        check_budget(config, limit_mb, batch)
    release()
    previous = mx.set_memory_limit(int(limit_mb * MB))
    previous_cache = mx.set_cache_limit(int((cache_limit_mb or limit_mb) * MB))
    try:
        with one_process():  # the budget is the whole job's: no share of it in peers
            yield
        check_peak(limit_mb)
    finally:
        mx.set_memory_limit(previous)
        mx.set_cache_limit(previous_cache)


def check_peak(limit_mb: float, what: str = "the run") -> float:
    """The measured peak (MB) since the last reset; raises when it is over ``limit_mb``.

    Call it between the phases of a run under :func:`enforce_limit`, so that an overrun
    ends the run at the next phase instead of at the end.

    Raises:
        MemoryBudgetExceeded: naming ``what``, the measured peak and the limit.
    """
    mx.synchronize()
    peak = mx.get_peak_memory() / MB
    if peak > limit_mb:
        raise MemoryBudgetExceeded(what, peak, limit_mb, "measured")
    return peak


def release(cache_limit_mb: float | None = None) -> None:
    """Between trials: drop dead arrays, empty MLX's buffer cache, reset the peak counter."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    if cache_limit_mb is not None:
        mx.set_cache_limit(int(cache_limit_mb * MB))
    mx.reset_peak_memory()
