"""A storage URL's password never reaches the output of any study verb, even when the
storage cannot be reached (the error names the storage, redacted)."""

import pytest

from search.cli import main

SECRET = "Zq9-s3cr3t"
URL = f"postgresql://ann:{SECRET}@127.0.0.1:1/none"  # nothing listens on port 1


@pytest.mark.parametrize("verb", [
    ("search", "--preset", "smoke", "--study", "s"),
    ("search", "--study", "s"),
    ("status", "s"), ("status", "s", "--trial", "0", "--json"),
    ("pareto", "s"), ("pareto", "s", "--json", "--all"), ("pareto", "s", "--csv"),
    ("report", "s"), ("export", "s", "0", "--out", "x"),
    ("distill", "s", "0"), ("compress", "s", "0"), ("schedule", "s", "0", "--steps", "4"),
])
def test_an_unreachable_storage_error_hides_the_password(verb, results, capsys, monkeypatch,
                                                         tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([*verb, "--storage", URL, "--results", str(results)]) == 2
    shown = capsys.readouterr()
    (line,) = shown.err.strip().splitlines()
    assert line.startswith("diffnas: error: cannot open storage postgresql://ann:***@127.0.0.1")
    assert SECRET not in shown.out + shown.err
    assert not results.exists()
