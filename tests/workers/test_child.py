"""A trial in its child process: real MLX, tiny config, no Ray."""

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest

from engine.io.checkpoint import load_weights
from search.run.dataset import build_payload
from search.space import load_space
from workers.process import run_in_child
from workers.records import Decision, EventKind, Outcome, TrialRequest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    space = load_space("smoke")
    payload = build_payload(space.data, tmp_path_factory.mktemp("feature-nets"))
    values = {"unet.base_width": 8, "unet.activation": "relu", "schedule.sampler": "ddim",
              "schedule.steps": 2, "train.learning_rate": 2e-3}
    config = space.decode(values)
    request = TrialRequest(7, 0, config.to_dict(), space.rungs.steps(config.train.steps),
                           fid_samples=16, grid_images=4, latency_rounds=2)
    return space, payload, request


def test_completed_trial_returns_values_and_loadable_artifacts(smoke, tmp_path):
    _, payload, request = smoke
    seen = []

    def relay(kind, payload_, needs):
        seen.append((kind, needs))
        return Decision()

    outcome = run_in_child(request, payload, relay)
    assert outcome.status is Outcome.COMPLETED, outcome.reason
    assert set(outcome.values) == {"fid", "latency_ms", "peak_mem_mb"}
    assert all(np.isfinite(v) and v > 0 for v in outcome.values.values())
    assert [k for k, _ in seen] == [EventKind.MEASURED, EventKind.RUNG, EventKind.RUNG]
    assert [r.step for r in outcome.rungs] == list(request.rungs)
    metrics = json.loads(outcome.artifacts["metrics.json"])
    assert metrics["quality"]["n"] == 16 and metrics["device"]["backend"] in ("cpu", "metal")
    assert outcome.artifacts["samples.png"].startswith(b"\x89PNG")
    for rel, data in outcome.artifacts.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    config, _ = load_weights(tmp_path / "checkpoint")
    assert config.to_dict() == request.config


def test_prune_decision_stops_at_the_rung(smoke):
    _, payload, request = smoke

    def relay(kind, payload_, needs):
        return Decision(False, "dominated at rung") if kind is EventKind.RUNG else Decision()

    outcome = run_in_child(request, payload, relay)
    assert outcome.status is Outcome.PRUNED and outcome.reason == "dominated at rung"
    assert [r.step for r in outcome.rungs] == [request.rungs[0]] and not outcome.artifacts


def test_killed_child_is_a_crash_with_the_signal(smoke):
    _, payload, request = smoke
    pids = []

    def relay(kind, payload_, needs):
        os.kill(pids[0], signal.SIGKILL)
        return Decision()

    outcome = run_in_child(request, payload, relay, on_start=pids.append)
    assert outcome.status is Outcome.CRASHED and outcome.exit_code == -signal.SIGKILL
    assert "killed by SIGKILL" in outcome.reason


def test_candidate_error_fails_without_retry(smoke):
    _, payload, request = smoke
    bad = replace(payload, train=payload.train[..., :0])  # zero channels: the model raises
    outcome = run_in_child(request, bad, lambda *a: Decision())
    assert outcome.status is Outcome.FAILED and outcome.reason
