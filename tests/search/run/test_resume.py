"""The coordinator is SIGKILLed mid-study and the same command is run again."""

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from search.storage import lineage as lin
from search.storage import study as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _command(ray_cluster, results, storage, trials):
    return [sys.executable, "-m", "search.cli", "search", "--preset", "smoke",
            "--study", "crash", "--results", str(results), "--storage", storage,
            "--address", ray_cluster.address, "--insecure", "--workers", "2",
            "--trials", str(trials)]


def _trials(storage):
    try:
        return optuna.load_study(study_name="crash", storage=storage).get_trials()
    except Exception:  # noqa: BLE001 (not created yet, or the file is mid-creation)
        return []


def _wait_until_mid_study(storage, proc, timeout_s=180):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = [t.state for t in _trials(storage)]
        if TrialState.COMPLETE in states and TrialState.RUNNING in states:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.3)
    raise AssertionError("the study never had a finished and a running trial at once")


def test_sigkilled_coordinator_resumes_without_loss_or_duplicates(ray_cluster, results,
                                                                   storage):
    command = _command(ray_cluster, results, storage, trials=5)
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_until_mid_study(storage, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: t for t in _trials(storage)}
    completed_before = {n: t.values for n, t in before.items() if t.state == TrialState.COMPLETE}
    stale = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert completed_before and stale

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert second.returncode == 0, second.stderr
    assert "(resumed)" in second.stdout

    after = {t.number: t for t in _trials(storage)}
    # Nothing completed is lost or changed; nothing is run twice.
    for number, values in completed_before.items():
        assert after[number].values == values
    finished = [t for t in after.values() if st.is_finished(t)]
    assert len(finished) == 5 and all(t.state == TrialState.COMPLETE for t in finished)
    for number in stale:
        assert after[number].state == TrialState.FAIL and after[number].user_attrs[lin.REQUEUED]
        reruns = [t for t in after.values() if t.user_attrs.get(lin.REQUEUED_FROM) == number]
        # The re-run keeps every parameter the stale trial had; a coordinator killed while
        # it asked the trial's parameters left only the first ones, and the re-run asks the
        # rest.
        assert len(reruns) == 1
        assert after[number].params.items() <= reruns[0].params.items()
    for t in finished:
        assert (results / "crash" / f"trial-{t.number}" / "samples.png").is_file()
    assert not list((results / "crash").glob("*.partial"))
