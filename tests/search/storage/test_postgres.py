"""The study storage on a real PostgreSQL server (tests/search/storage/conftest.py): a
trial record round-trips, stale trials requeue, a tiny search runs, and a SIGKILLed
coordinator resumes; the server's password never reaches any output."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import report
from search.cli import main
from search.space import load_space
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage import study as st

LEARNING_RATE = "{ float = [1e-3, 3e-3], log = true }"  # a space must search something

ROOT = Path(__file__).resolve().parents[3]
FINISHED = rec.Finished(reason="", feasible=True, worker="w1", node={"id": "n", "host": "h"},
                        quality={"fid": 3.25, "fid_floor": 0.5}, timings={"wall_s": 8.0},
                        device_class="cpu:a")
RUNGS = rec.Rungs((rec.Rung(10, 0.5, 0.6, 1.0, 0, "continue", "", ((5, 0.7), (10, 0.5))),))


@pytest.fixture()
def storage(pg_storage):
    """The search fixtures (``tiny_search``) write to PostgreSQL here, not SQLite."""
    return pg_storage


def test_a_trial_record_round_trips_through_postgresql(pg_storage):
    space = load_space("smoke")
    study, _, resumed = st.open_study(st.open_storage(pg_storage, create=True), "pg", space)
    assert not resumed and pg_storage.startswith("postgresql://")
    trial = study.ask(fixed_distributions=space.distributions())
    rec.write(trial, FINISHED, RUNGS)
    study.tell(trial, [3.25, 20.0, 1.5])

    again, stored, resumed = st.open_study(st.open_storage(pg_storage, create=False), "pg",
                                           None)
    assert resumed and stored.fingerprint() == space.fingerprint()
    record = rec.read(again.trials[0])
    assert record.finished == FINISHED and record.rungs == RUNGS.items
    assert record.values == (3.25, 20.0, 1.5) and record.params == trial.params


def test_stale_trials_requeue_once_on_postgresql(pg_storage):
    space = load_space("smoke")
    study, _, _ = st.open_study(st.open_storage(pg_storage, create=True), "pg", space)
    done, stale = (study.ask(fixed_distributions=space.distributions()) for _ in range(2))
    study.tell(done, [1.0, 2.0, 3.0])
    storage = st.open_storage(pg_storage, create=False)  # a new coordinator's connection
    study, _, _ = st.open_study(storage, "pg", None)
    assert st.recover_stale(study, storage) == [stale.number]
    assert st.recover_stale(study, storage) == []
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[lin.REQUEUED_FROM] for t in waiting] == [stale.number]
    rerun = study.ask(fixed_distributions=space.distributions())
    assert rerun.params == stale.params and rerun.user_attrs[lin.REQUEUED_FROM] == stale.number


def test_a_wrong_password_is_one_line_without_either_password(pg_storage, postgres_server):
    _, password = postgres_server
    wrong = pg_storage.replace(password, "Wr0ng-guess")
    with pytest.raises(st.StudyError) as err:
        st.open_storage(wrong, create=True)
    message = str(err.value)
    assert message.startswith("cannot open storage postgresql://diffnas:***@127.0.0.1")
    assert "password authentication failed" in message and "\n" not in message
    assert password not in message and "Wr0ng-guess" not in message


def diffnas(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _verbs(study, trial, storage, results, out):
    """The reading verbs' arguments against ``study`` (and its complete ``trial``)."""
    where = ("--storage", storage, "--results", results)
    return [("status", study, *where), ("status", study, "--trial", trial, *where),
            ("pareto", study, *where), ("pareto", study, "--json", "--all", *where),
            ("pareto", study, "--csv", "--all", *where),
            ("report", study, "--out", out / "report.html", *where),
            ("export", study, trial, "--out", out / "export", *where)]


def test_a_tiny_search_runs_on_postgresql_and_the_verbs_read_it(
        ray_cluster, tiny_search, pg_storage, postgres_server, results, tmp_path, capsys):
    _, password = postgres_server
    result, study = tiny_search("pgtiny", {"train": {"steps": "10",  # the storage is the point
                                                     "learning_rate": LEARNING_RATE}})
    assert result.finished == 2 and len(study.trials) == 2
    assert password not in repr(result) and st.redact(pg_storage) in repr(result)
    hint = report.dashboard_command(result.storage, results / "artifacts")
    assert password not in hint and ":***@127.0.0.1" in hint

    done = next(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    for args in _verbs("pgtiny", done, pg_storage, results, tmp_path):  # in-process: fast
        assert main([str(a) for a in args]) == 0
        shown = capsys.readouterr()
        assert shown.out and password not in shown.out + shown.err
    assert password not in (tmp_path / "report.html").read_text()
    assert (tmp_path / "export" / "config.json").is_file()


def _trials(storage, name):
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except Exception:  # noqa: BLE001 (not created yet)
        return []


def _wait_until_mid_study(storage, name, proc, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = [t.state for t in _trials(storage, name)]
        if TrialState.COMPLETE in states and TrialState.RUNNING in states:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.3)
    raise AssertionError("the study never had a finished and a running trial at once")


@pytest.mark.slow
def test_a_sigkilled_coordinator_resumes_on_postgresql(ray_cluster, pg_storage,
                                                       postgres_server, results, tmp_path):
    _, password = postgres_server
    command = [sys.executable, "-m", "search.cli", "search", "--preset", "smoke", "--study",
               "pgcrash", "--results", str(results), "--storage", pg_storage, "--address",
               ray_cluster.address, "--workers", "2", "--trials", "5"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    _wait_until_mid_study(pg_storage, "pgcrash", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: t for t in _trials(pg_storage, "pgcrash")}
    completed = {n: t.values for n, t in before.items() if t.state == TrialState.COMPLETE}
    stale = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert completed and stale

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    assert second.returncode == 0, second.stderr
    assert "(resumed)" in second.stdout and "dashboard: " in second.stdout
    assert password not in second.stdout + second.stderr
    after = {t.number: t for t in _trials(pg_storage, "pgcrash")}
    for number, values in completed.items():
        assert after[number].values == values
    assert sum(st.is_finished(t) for t in after.values()) == 5
    for number in stale:
        assert after[number].state == TrialState.FAIL and after[number].user_attrs[lin.REQUEUED]

    for args in _verbs("pgcrash", min(completed), pg_storage, results, tmp_path):
        proc = diffnas(*args)
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr
    assert password not in (tmp_path / "report.html").read_text()
