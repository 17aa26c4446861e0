"""engine.device.contention.batch_scheduled: the graph-building thread yields to MLX's
computing thread when both share one core, and only then."""

import os
import sys
from contextlib import contextmanager
from typing import ClassVar

import mlx.core as mx
import pytest

from engine.config import ScheduleConfig, UNetConfig
from engine.device.contention import batch_scheduled
from engine.model.unet import UNet
from engine.sampling.samplers import generate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux policies")


@contextmanager
def cores(n: int):
    """This thread on ``n`` of the cores it may use (the test needs that many)."""
    mine = os.sched_getaffinity(0)
    if len(mine) < n:
        pytest.skip(f"needs {n} cores")
    os.sched_setaffinity(0, set(sorted(mine)[:n]))
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def test_on_one_core_the_caller_runs_as_a_batch_thread_and_is_restored():
    with cores(1):
        with batch_scheduled():
            assert os.sched_getscheduler(0) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_on_two_cores_nothing_changes():
    with cores(2), batch_scheduled():
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


class Recording(UNet):
    """A U-Net that notes its caller's scheduling policy (when traced, inside generate)."""

    policies: ClassVar[list[int]] = []

    def __call__(self, *args):
        self.policies.append(os.sched_getscheduler(0))
        return super().__call__(*args)


@pytest.mark.parametrize("n, policy", [(1, "SCHED_BATCH"), (2, "SCHED_OTHER")])
def test_sampling_on_one_core_builds_its_graph_as_a_batch_thread(n, policy):
    model = Recording(UNetConfig(base_width=8, norm_groups=4, width_mults=(1,), image_size=8))
    Recording.policies = []
    with cores(n):
        mx.eval(generate(model, ScheduleConfig(sampler="ddim", steps=2), 1, 0, 8, 1))
    assert Recording.policies and set(Recording.policies) == {getattr(os, policy)}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
