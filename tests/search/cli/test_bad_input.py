"""Bad input to every verb: a non-zero exit, one line on stderr naming the culprit (the flag,
field or path), and nothing written -- no study created, an existing storage byte-identical.

Most cases run ``search.cli.main`` in-process (fast); two run the real ``diffnas`` process
to show that no traceback escapes.
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from search.cli import main
from search.storage import study as st

SEARCHED = "[unet]\nbase_width = { choice = [8, 16] }\n"


def _cli(capsys, *args):
    """``(exit code, stderr)`` of ``diffnas ARGS`` run in this process."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _refused(result, *fragments):
    code, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("diffnas: error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def a_file(tmp_path):
    """A regular file, ``tmp_path/file``, that paths are put under."""
    path = tmp_path / "file"
    path.write_text("not a folder\n")
    return path


# -- space files -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "[study]\ntrials = 3\n",
                                  "[unet]\nbase_width = 8\n[train]\nsteps = 10\n"])
def test_a_space_that_searches_nothing_is_refused(capsys, tmp_path, existing, results, text):
    space = tmp_path / "empty.toml"
    space.write_text(text)
    before = _digest(existing)
    _refused(_cli(capsys, "search", "--space", space, "--results", results),
             str(space), "searches nothing")
    assert _digest(existing) == before
    assert st.study_names(st.open_storage(f"sqlite:///{existing}", create=False)) == ["smoke"]


@pytest.mark.parametrize(("text", "fragments"), [
    ("[unet\nbase_width = 8\n", ("invalid TOML", "line 1")),
    (SEARCHED + "widht_mults = [1, 2]\n", ("[unet] unknown key 'widht_mults'", "did you mean")),
    (SEARCHED + "[trian]\nsteps = 3\n", ("unknown table [trian]",)),
    ("[unet]\nbase_width = { choice = [1e9] }\n", ("[unet] base_width", "1000000000")),
    (SEARCHED + "[train]\nsteps = true\n", ("[train] steps", "expected int, got True")),
    (SEARCHED + "[train]\nsteps = 10.5\n", ("[train] steps", "expected int, got 10.5")),
    (SEARCHED + 'width_mults = "12"\n', ("[unet] width_mults", "expected a list, got '12'")),
    (SEARCHED + '[train]\nbatch_size = "abc"\n', ("[train] batch_size", "got 'abc'")),
    ("[unet]\nbase_width = { float = [8, 16] }\n", ("[unet] base_width", "float range")),
    ("[unet]\nbase_width = { int = [8, 100000] }\n", ("[unet] base_width", "must be in")),
])
def test_an_invalid_space_is_one_line_naming_the_key(capsys, tmp_path, existing, results,
                                                      text, fragments):
    space = tmp_path / "bad.toml"
    space.write_text(text)
    before = _digest(existing)
    _refused(_cli(capsys, "search", "--space", space, "--results", results), str(space),
             *fragments)
    assert _digest(existing) == before


# -- numeric flags ---------------------------------------------------------------------------

def test_search_refuses_a_latency_target_at_or_below_zero(capsys, existing, results):
    before = _digest(existing)
    for value in ("0", "-2.5", "nan"):
        _refused(_cli(capsys, "search", "--preset", "smoke", "--study", "fresh", "--results",
                      results, "--max-latency-ms", value), "--max-latency-ms: must be > 0")
    assert _digest(existing) == before


@pytest.mark.parametrize(("flags", "culprit"), [
    (("--trials", "0"), "--trials"), (("--trials", "-1"), "--trials"),
    (("--max-retries", "-1"), "--max-retries"), (("--timeout", "0"), "--timeout"),
    (("--timeout", "-5"), "--timeout"), (("--timeout", "nan"), "--timeout"),
    (("--seed", "-1"), "--seed"), (("--distill-front", "-1"), "--distill-front"),
    (("--distill-steps", "0"), "--distill-steps"),
])
def test_search_refuses_counts_below_their_minimum(capsys, existing, results, flags, culprit):
    before = _digest(existing)
    _refused(_cli(capsys, "search", "--preset", "smoke", "--study", "fresh", "--results",
                  results, *flags), f"argument {culprit}", repr(flags[1]))
    assert _digest(existing) == before
    assert st.study_names(st.open_storage(f"sqlite:///{existing}", create=False)) == ["smoke"]


@pytest.mark.parametrize(("args", "culprit"), [
    (("sample", "ckpt", "--n", "0"), "--n"), (("sample", "ckpt", "--steps", "0"), "--steps"),
    (("sample", "ckpt", "--seed", "-1"), "--seed"),
    (("train", "--config", "tiny", "--eval-samples", "3"), "--eval-samples"),
    (("bench", "--config", "tiny", "--batch", "0"), "--batch"),
    (("memory", "--config", "tiny", "--budget-mb", "-1"), "--budget-mb"),
    (("distill", "smoke", "0", "--steps", "0"), "--steps"),
    (("distill", "smoke", "0", "--teacher-steps", "0"), "--teacher-steps"),
    (("distill", "smoke", "0", "--retries", "-1"), "--retries"),
    (("distill", "smoke", "0", "--max-fid-ratio", "0"), "--max-fid-ratio"),
    (("distill", "smoke", "0", "--train-steps", "0"), "--train-steps"),
    (("distill", "smoke", "0", "--batch-size", "0"), "--batch-size"),
    (("compress", "smoke", "0", "--finetune-steps", "-1"), "--finetune-steps"),
    (("compress", "smoke", "0", "--max-fid-increase", "-5%"), "--max-fid-increase"),
    (("compress", "smoke", "0", "--max-fid-increase", "inf"), "--max-fid-increase"),
    (("schedule", "smoke", "0", "--steps", "0"), "--steps"),
    (("schedule", "smoke", "0", "--steps", "4", "--seconds", "0"), "--seconds"),
    (("schedule", "smoke", "0", "--steps", "4", "--batch", "0"), "--batch"),
    (("schedule", "smoke", "0", "--steps", "4", "--seed", "-2"), "--seed"),
    (("pareto", "smoke", "--reference", "1,2,0"), "--reference"),
    (("pareto", "smoke", "--reference", "1,2,nan"), "--reference"),
    (("pareto", "smoke", "--reference", "1,2"), "--reference"),
])
def test_every_verb_refuses_numbers_out_of_range(capsys, existing, results, args, culprit):
    before = _digest(existing)
    _refused(_cli(capsys, *args, *(["--results", results] if args[0] not in (
        "sample", "train", "bench", "memory") else [])), f"argument {culprit}")
    assert _digest(existing) == before


@pytest.mark.parametrize(("train", "fragment"), [
    ({"steps": True}, "TrainConfig.steps: expected int, got True"),
    ({"steps": 10.5}, "TrainConfig.steps: expected int, got 10.5"),
    ({"steps": "abc"}, "TrainConfig.steps: expected int, got 'abc'"),
    ({"batch_size": 100000}, "TrainConfig.batch_size=100000: must be in"),
])
def test_a_config_file_is_typed_exactly(capsys, tmp_path, train, fragment):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"unet": {"base_width": 8, "norm_groups": 4}, "train": train}))
    _refused(_cli(capsys, "memory", "--config", config), str(config), fragment)
    config.write_text(json.dumps({"unet": {"base_width": 1e9}}))
    _refused(_cli(capsys, "bench", "--config", config), "UNetConfig.base_width=1000000000")
    config.write_text(json.dumps({"unet": {"width_mults": "12"}}))
    _refused(_cli(capsys, "memory", "--config", config), "UNetConfig.width_mults")


# -- data too small for the FID sample count -------------------------------------------------

def test_search_refuses_more_fid_samples_than_the_data_holds(capsys, tmp_path, results):
    space = tmp_path / "fid.toml"
    space.write_text(SEARCHED + "[evaluate]\nfid_samples = 2501\n")  # digits: 5000 images
    _refused(_cli(capsys, "search", "--space", space, "--results", results),
             "[evaluate] fid_samples = 2501", "5002", "has 5000")
    assert not results.exists()  # before the storage, the feature network, any trial


def test_train_refuses_more_eval_samples_than_the_data_holds(capsys, tmp_path):
    data = tmp_path / "small.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 255, (20, 16, 16), np.uint8))
    out = tmp_path / "out"
    _refused(_cli(capsys, "train", "--config", "tiny", "--data", data, "--eval-samples", "16",
                  "--out", out), "--eval-samples = 16", "32", "has 20")
    assert not out.exists()  # refused before training


# -- paths under a regular file --------------------------------------------------------------

def test_storage_under_a_file_is_one_line(capsys, a_file, results):
    for url in (f"sqlite:///{a_file}/x.db", f"journal:{a_file}/x.log"):
        _refused(_cli(capsys, "search", "--preset", "smoke", "--storage", url, "--results",
                      results), f"storage {a_file}/x", f"{a_file} is a file")
        _refused(_cli(capsys, "status", "smoke", "--storage", url), f"{a_file} is a file")
    assert a_file.read_text() == "not a folder\n" and not results.exists()


def test_results_that_is_or_is_under_a_file_is_one_line(capsys, a_file):
    for results in (a_file, a_file / "sub"):
        _refused(_cli(capsys, "search", "--preset", "smoke", "--results", results),
                 f"--results {results}", "is a file")
        _refused(_cli(capsys, "pareto", "smoke", "--results", results), f"--results {results}")
    assert a_file.read_text() == "not a folder\n"


def test_outputs_onto_or_under_a_file_are_one_line(capsys, tmp_path, a_file, existing, results):
    before = _digest(existing)
    _refused(_cli(capsys, "export", "smoke", "0", "--out", a_file, "--results", results),
             f"--out {a_file}", "is a file")
    _refused(_cli(capsys, "pareto", "smoke", "--plot", a_file / "p.png", "--results", results),
             f"--plot {a_file}/p.png")
    _refused(_cli(capsys, "report", "smoke", "--out", tmp_path, "--results", results),
             f"--out {tmp_path}", "is a folder")
    _refused(_cli(capsys, "sample", "ckpt", "--out", a_file / "s.png"), f"--out {a_file}/s.png")
    _refused(_cli(capsys, "train", "--config", "tiny", "--out", a_file), f"--out {a_file}")
    assert _digest(existing) == before and a_file.read_text() == "not a folder\n"


# -- the real process ------------------------------------------------------------------------

def _process(*args):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_real_process_prints_one_line_and_no_traceback(tmp_path, a_file, results):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for args, fragment in [(("search", "--space", empty), "searches nothing"),
                           (("search", "--preset", "smoke", "--trials", "-1"), "--trials"),
                           (("search", "--preset", "smoke", "--storage",
                             f"sqlite:///{a_file}/x.db"), "is a file")]:
        proc = _process(*args, "--results", results)
        _refused((proc.returncode, proc.stderr), fragment)
        assert "Traceback" not in proc.stderr
    assert not results.exists()


# -- a class-conditional space on data without the labels it needs ---------------------------

def test_search_refuses_a_conditional_space_on_unlabelled_data(capsys, tmp_path, results):
    rng = np.random.default_rng(0)
    data = tmp_path / "plain.npz"
    np.savez(data, images=rng.integers(0, 255, (40, 16, 16), np.uint8))
    space = tmp_path / "cond.toml"
    space.write_text(SEARCHED + f"num_classes = 10\n[data]\ndataset = '{data}'\n"
                     "[evaluate]\nfid_samples = 8\n")
    _refused(_cli(capsys, "search", "--space", space, "--results", results),
             "[unet] num_classes = 10", "'plain' has no labels")
    np.savez(data, images=rng.integers(0, 255, (40, 16, 16), np.uint8),
             labels=np.arange(40) % 12)
    _refused(_cli(capsys, "search", "--space", space, "--results", results),
             "[unet] num_classes = 10", "labels up to 11")
    assert not (results / "feature-nets").exists()  # refused before any network trains
