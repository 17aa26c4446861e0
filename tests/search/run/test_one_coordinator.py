"""One coordinator per study: real `diffnas search` processes against one SQLite storage."""

import os
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from search.storage import lease
from search.storage import record as rec
from search.storage import study as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TRIALS = 2  # one round on the two workers


def _start(ray_cluster, results, storage):
    command = [sys.executable, "-m", "search.cli", "search", "--preset", "smoke",
               "--study", "one", "--results", str(results), "--storage", storage,
               "--address", ray_cluster.address, "--insecure", "--workers", "2",
               "--trials", str(TRIALS)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _refused(proc):
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "being searched by another coordinator on host" in lines[0], lines
    return lines[0]


def _first_to_exit(procs, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(0.2)
    raise AssertionError("neither coordinator stopped")


def _trials(storage):
    return optuna.load_study(study_name="one", storage=storage).get_trials()


def test_a_second_coordinator_is_refused_and_the_first_finishes(ray_cluster, results,
                                                                 storage):
    pair = [_start(ray_cluster, results, storage) for _ in range(2)]  # started together
    loser = _first_to_exit(pair)
    (winner,) = [p for p in pair if p is not loser]
    assert f"pid {winner.pid} " in _refused(loser)
    deadline = time.time() + 180
    while not any(t.state == TrialState.RUNNING for t in _trials(storage)):
        assert winner.poll() is None and time.time() < deadline, winner.stderr.read()
        time.sleep(0.3)
    late = _start(ray_cluster, results, storage)  # started while the first one runs
    assert f"pid {winner.pid} " in _refused(late)
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err
    trials = _trials(storage)
    assert sum(st.is_finished(t) for t in trials) == TRIALS
    assert all(t.state == TrialState.COMPLETE for t in trials), [rec.read(t).reason
                                                                 for t in trials]
    study = st.load_existing(st.open_storage(storage, create=False), "one")
    assert "exited cleanly" in lease.describe(study)
