"""Where a trial's wall time goes, and the warm process it forks from: real MLX, no Ray."""

import os
import signal
import sys
import time
from dataclasses import replace

import pytest

from search.run.dataset import build_payload
from search.space import load_space
from workers.forkserver import START_ENV, ForkServer, default_launcher
from workers.process import Spawn, run_in_child
from workers.records import WALL_PHASES, Decision, EventKind, Outcome, TrialRequest

# Phases every completed trial spends time in (table_s only with a latency table).
SPENT = {"start_s", "transfer_s", "train_s", "validate_s", "features_s", "fid_s", "latency_s",
         "write_s", "idle_s"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    space = load_space("smoke")
    payload = build_payload(space.data, tmp_path_factory.mktemp("feature-nets"))
    config = space.decode({"unet.base_width": 8, "unet.activation": "relu",
                           "schedule.sampler": "ddim", "schedule.steps": 2,
                           "train.learning_rate": 2e-3})
    request = TrialRequest(5, 0, config.to_dict(), space.rungs.steps(config.train.steps),
                           fid_samples=16, grid_images=4, latency_runs=2, latency_rounds=2)
    return payload, request


@pytest.fixture()
def server():
    fork = ForkServer()
    yield fork
    fork.close()


def _answer(kind, payload, needs):
    return Decision()


def _check_breakdown(outcome, elapsed_s, mode):
    assert outcome.status is Outcome.COMPLETED, outcome.reason
    wall = outcome.walltime
    assert wall is not None and wall.mode == mode
    phases = wall.phases()
    assert list(phases) == list(WALL_PHASES)
    assert all(v >= 0.0 for v in phases.values()), phases
    assert {p for p, v in phases.items() if v > 0} >= SPENT, phases
    assert sum(phases.values()) == pytest.approx(wall.wall_s, rel=1e-6)
    assert 0 < wall.wall_s <= elapsed_s  # within the call that ran it
    assert wall.other_s < wall.wall_s / 2  # the named phases hold most of it
    assert 0 < wall.answers_s <= wall.idle_s  # it asked the coordinator at every stage


@pytest.mark.parametrize("launcher", [Spawn, ForkServer])
def test_a_trial_records_every_phase_adding_up_to_its_wall_time(smoke, launcher):
    payload, request = smoke
    start = time.time()
    outcome = run_in_child(request, payload, _answer, launcher=launcher())
    _check_breakdown(outcome, time.time() - start, launcher.mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm process is Linux's")
def test_forked_trials_share_one_warm_process_and_a_killed_one_fails_alone(smoke, server):
    payload, request = smoke
    pids = []

    def kill_at_measured(kind, payload_, needs):
        if kind is EventKind.MEASURED:
            os.kill(pids[-1], signal.SIGKILL)
        return Decision()

    killed = run_in_child(request, payload, kill_at_measured, on_start=pids.append,
                          launcher=server)
    assert killed.status is Outcome.CRASHED and killed.exit_code == -signal.SIGKILL
    assert "killed by SIGKILL" in killed.reason and killed.walltime is None
    warm = server._proc.pid
    assert len(os.listdir(f"/proc/{warm}/task")) == 1  # nothing but the main thread to fork
    start = time.time()
    after = run_in_child(replace(request, number=6), payload, _answer, on_start=pids.append,
                         launcher=server)
    _check_breakdown(after, time.time() - start, "fork")
    assert server._proc.pid == warm and pids[0] != pids[1]
    # Its own CPU time, not the warm process's imports too: a forked child's clock starts
    # at the fork, and at most two threads compute (MLX's CPU stream and this one).
    assert after.timings["cpu_s"] < 2 * after.walltime.wall_s


def test_the_warm_process_gets_the_data_once(smoke, server):
    payload, _ = smoke
    started_s, sent_s, held = server.prepare(payload)
    assert held and started_s > 0 and sent_s > 0
    assert server.prepare(payload) == (0.0, 0.0, True)
    other = replace(payload, val=payload.val[:-1])
    assert server.prepare(other)[1] > 0


def test_an_unknown_start_mode_is_named(monkeypatch):
    monkeypatch.setenv(START_ENV, "vfork")
    with pytest.raises(ValueError, match=f"{START_ENV}='vfork'"):
        default_launcher()
    monkeypatch.setenv(START_ENV, "spawn")
    assert default_launcher().mode == "spawn"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is Linux's default")
def test_an_mlx_cuda_install_spawns_its_trials(monkeypatch, tmp_path, fake_cuda_install):
    # A child forked after CUDA started dies at its first kernel (every trial, on an H200).
    monkeypatch.delenv(START_ENV, raising=False)
    assert default_launcher().mode == "fork"
    monkeypatch.syspath_prepend(str(fake_cuda_install(tmp_path)))
    assert default_launcher().mode == "spawn"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm process is Linux's")
def test_a_dead_warm_process_crashes_its_trial_and_the_next_starts_a_new_one(smoke, server):
    payload, request = smoke

    def kill_warm_at_measured(kind, payload_, needs):
        if kind is EventKind.MEASURED:
            os.kill(server._proc.pid, signal.SIGKILL)
        return Decision()

    crashed = run_in_child(request, payload, kill_warm_at_measured, launcher=server)
    assert crashed.status is Outcome.CRASHED and "SIGKILL" in crashed.reason
    dead = server._proc  # forgotten (None) once its end was seen
    assert dead is None or dead.poll() is not None
    after = run_in_child(request, payload, _answer, launcher=server)
    assert after.status is Outcome.COMPLETED, after.reason
    assert server._proc is not dead and server._proc.poll() is None
