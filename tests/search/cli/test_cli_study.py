"""The study verbs: bad input gives one line and a non-zero exit, and stores nothing.

One case runs the real ``diffnas`` process (no traceback reaches the terminal; more in
tests/search/cli/test_bad_input.py); the rest run ``search.cli.main`` in this process.
"""

import argparse
import hashlib
import subprocess
import sys

from search.cli.study import register
from search.space import load_space


def diffnas(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffnas: error: "), proc.stderr
    assert fragment in lines[0]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unknown_study(existing, results, in_process):
    before = _digest(existing)
    _one_line_error(diffnas("status", "nope", "--results", results), "unknown study 'nope'")
    _one_line_error(in_process("search", "--study", "nope", "--results", results),
                    "unknown study 'nope'")
    _one_line_error(in_process("export", "smoke", "3", "--out", results / "x",
                                "--results", results), "has no trial 3")
    assert _digest(existing) == before


def test_bad_storage_url(results, in_process):
    _one_line_error(in_process("search", "--preset", "smoke", "--storage",
                                "postgresql://nobody@127.0.0.1:1/none", "--results", results),
                    "cannot open storage postgresql://")
    _one_line_error(in_process("pareto", "smoke", "--storage",
                                "sqlite:////no/such/dir/x.db"),
                    "no study storage at /no/such/dir/x.db")
    assert not results.exists()


def test_invalid_space_file(tmp_path, existing, results, in_process):
    space = tmp_path / "space.toml"
    space.write_text("[study]\ntrials = 3\n\n[unet]\nbase_width = { choice = [16, 'wide'] }\n")
    before = _digest(existing)
    _one_line_error(in_process("search", "--space", space, "--results", results),
                    f"{space}:5: [unet] base_width: value 'wide'")
    _one_line_error(in_process("search", "--space", tmp_path / "missing.toml",
                                "--results", results), "no such space file or preset")
    assert _digest(existing) == before


def test_missing_dataset_touches_no_storage(tmp_path, results, in_process):
    space = tmp_path / "space.toml"
    space.write_text((load_space("smoke").source).replace('dataset = "digits"',
                                                          f'dataset = "{tmp_path}/none"'))
    _one_line_error(in_process("search", "--space", space, "--results", results),
                    f"dataset not found: {tmp_path}/none")
    _one_line_error(in_process("search", "--study", "space", "--results", results),
                    "no study storage")
    assert not (results / "diffnas.db").exists()


def test_register_adds_the_study_verbs():
    parser = argparse.ArgumentParser(prog="diffnas")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["search", "--preset", "smoke", "--trials", "3", "--workers", "2"])
    assert (args.command, args.preset, args.trials, args.workers) == ("search", "smoke", 3, 2)
    args = parser.parse_args(["pareto", "demo", "--reference", "300,50,10"])
    assert args.reference == (300.0, 50.0, 10.0)
    assert parser.parse_args(["status", "demo", "--trial", "4"]).trial == "4"
    assert parser.parse_args(["status", "demo", "--trial", "d0"]).trial == "d0"
    args = parser.parse_args(["search", "--distill-front", "2", "--distill-steps", "2"])
    assert (args.distill_front, args.distill_steps, args.distill_method) == (2, 2, "progressive")
    for verb in ("export", "workers"):
        assert parser.parse_args([verb, "s", "1", "--out", "o"] if verb == "export" else [verb])
