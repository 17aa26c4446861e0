"""Data integrity at the storage boundary: study names, results folders, damaged files.

Real SQLite files and the real CLI, in a subprocess or (``in_process``) in this one.
"""

import hashlib
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search.space import load_space
from search.storage import artifacts
from search.storage import record as rec
from search.storage import study as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def one_line_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffnas: error: ") and all(w in lines[0] for w in words), lines
    return lines[0]


@pytest.mark.parametrize("name", ["../../tmp/evil", "/tmp/evil", "a/b", "..", ".", "", "x" * 101,
                                  "a\\b", "ok name"])
def test_names_that_could_leave_the_results_folder_are_refused(name):
    with pytest.raises(st.StudyError, match="study name"):
        st.check_name(name)


def test_valid_names_pass():
    for name in ("smoke", "demo-2.v1_b", "x" * 100, "..a"):
        assert st.check_name(name) == name


def test_under_refuses_escapes_and_links(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    assert artifacts.under(root, "s", "trial-3") == (root / "s" / "trial-3").resolve()
    with pytest.raises(st.StudyError, match="escapes"):
        artifacts.under(root, "..", "elsewhere")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(st.StudyError, match="escapes"):
        artifacts.under(root, "link", "x")


def test_search_with_an_escaping_name_writes_nothing(tmp_path, results, in_process):
    proc = cli("search", "--preset", "smoke", "--study", "../../evil", "--results", results)
    one_line_error(proc, "'../../evil'")
    assert not results.exists() and not (tmp_path.parent / "evil").exists()
    one_line_error(in_process("status", "/tmp/evil", "--results", results), "study name")


def _study(url, name="s"):
    return st.open_study(st.open_storage(url, create=True), name, load_space("smoke"))[0]


def test_a_results_folder_belongs_to_one_study(tmp_path, results, storage):
    first = _study(storage)
    folder = artifacts.claim(results, first)
    assert first.user_attrs["results"] == str(folder)
    assert artifacts.owner_of(folder) == first.user_attrs["uid"]
    assert artifacts.claim(results, _study(storage)) == folder  # the same study, resumed
    other = _study(f"sqlite:///{tmp_path / 'other.db'}")  # same name, another storage
    with pytest.raises(st.StudyError, match="another study named 's'"):
        artifacts.claim(results, other)


def test_export_refuses_artifacts_another_study_overwrote(tmp_path, results, storage):
    study = _study(storage)
    artifacts.claim(results, study)
    trial = study.ask()
    paths = artifacts.write_trial(artifacts.trial_dir(results, "s", trial.number),
                                  {"metrics.json": b"{}"})
    rec.write(trial, rec.Finished(artifacts=paths))
    study.tell(trial, [1.0, 2.0, 3.0])
    assert artifacts.export_trial(study, trial.number, tmp_path / "ok").is_dir()
    # Another storage's study of the same name took the folder over (bypassing claim).
    (results / "s" / artifacts.MARKER).write_text('{"id": "someone-else"}')
    with pytest.raises(st.StudyError, match="belong to another study"):
        artifacts.export_trial(study, trial.number, tmp_path / "bad")


@pytest.fixture()
def damaged(tmp_path, storage):
    """A real study storage (60 trials) with 8 KiB of garbage written mid-file."""
    study = _study(storage, "smoke")
    for i in range(60):
        trial = study.ask(fixed_distributions=load_space("smoke").distributions())
        trial.set_user_attr("note", "x" * 200 + str(i))
        study.tell(trial, [1.0 + i, 2.0, 3.0])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 60
    path = tmp_path / "results" / "diffnas.db"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8192] = os.urandom(8192)
    path.write_bytes(bytes(data))
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_storage_is_refused_in_one_line_and_left_untouched(damaged, results,
                                                                      tmp_path, in_process):
    before = _digest(damaged)
    one_line_error(cli("status", "smoke", "--results", results), "damaged", str(damaged))
    for args in (["pareto", "smoke"], ["export", "smoke", "0", "--out", tmp_path / "out"],
                 ["search", "--preset", "smoke", "--study", "new", "--trials", "1"]):
        one_line_error(in_process(*args, "--results", results), "damaged", str(damaged))
    assert _digest(damaged) == before
    with pytest.raises(st.StudyError, match="damaged"):
        st.open_storage(f"sqlite:///{damaged}", create=True)


def test_a_healthy_storage_passes_the_check(storage, results):
    study = _study(storage)
    st.check_sqlite(results / "diffnas.db")
    assert optuna.load_study(study_name="s", storage=storage).user_attrs["uid"] == \
        study.user_attrs["uid"]


def test_damage_after_opening_is_one_line_too(tmp_path):
    url = f"sqlite:///{tmp_path / 'late.db'}"
    storage = st.open_storage(url, create=True)
    study = st.open_study(storage, "s", load_space("smoke"))[0]
    for i in range(60):
        study.tell(study.ask(), [1.0 + i, 2.0, 3.0])
    path = tmp_path / "late.db"
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # every table page
    counter = int.from_bytes(data[24:28], "big") + 1  # so open connections drop their cache
    data[24:28] = counter.to_bytes(4, "big")
    path.write_bytes(bytes(data))  # damaged under a storage that passed its check
    with pytest.raises(st.StudyError, match="late.db failed: DatabaseError"):
        study.get_trials(deepcopy=False)
