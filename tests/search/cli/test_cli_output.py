"""Machine-readable and sectioned output of a real smoke study, through the real CLI.

One session-scoped study (``diffnas search --preset smoke``, then one derived point from
``diffnas compress``, each its own process) serves every test here; the verbs that read it
run through ``search.cli.main`` in this process (the same code, without an interpreter
start per call; tests/search/cli/test_bad_input.py runs the real process for its errors).
"""

import csv
import io
import json
import re
from pathlib import Path

import jsonschema
import pytest

from search import rows

README = rows.__file__.rsplit("/search/", 1)[0] + "/README.md"


@pytest.fixture()
def smoke(smoke_study, in_process):
    """``(results folder, the search's CompletedProcess, diffnas)`` of the session's smoke
    study, which has a d0 (``tests/search/conftest.py``); ``diffnas(*args)`` runs the CLI in
    this process (``in_process``) and returns its exit code, stdout and stderr."""
    return (*smoke_study, in_process)


def _json(smoke, *extra):
    proc = smoke[2]("pareto", "smoke", "--json", "--results", smoke[0], *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("scope", [(), ("--all",)])
def test_pareto_json_validates_against_the_schema(smoke, scope):
    doc = _json(smoke, *scope)
    jsonschema.validate(doc, rows.SCHEMA)
    assert doc["schema_version"] == rows.SCHEMA_VERSION
    ids = [r["id"] for r in doc["rows"]]
    if scope:
        assert ids == ["0", "1", "2", "3", "d0"] and doc["scope"] == "all"
    else:
        assert all(r["on_front"] for r in doc["rows"]) and doc["rows"]
        assert [r["fid"] for r in doc["rows"]] == sorted(r["fid"] for r in doc["rows"])
    for r in doc["rows"]:
        assert r["device_class"].startswith("cpu:") and r["fid_floor"] > 0
        assert set(r["params"]) == {"unet.base_width", "unet.activation", "schedule.sampler",
                                    "schedule.steps", "train.learning_rate"}
        assert any(path.endswith("samples.png") for path in r["artifacts"].values())


def test_the_schema_rejects_a_row_without_its_objectives(smoke):
    doc = _json(smoke, "--all")
    del doc["rows"][0]["fid"]
    with pytest.raises(jsonschema.ValidationError, match="'fid' is a required property"):
        jsonschema.validate(doc, rows.SCHEMA)


def test_pareto_csv_has_one_column_per_parameter_and_artifact(smoke):
    proc = smoke[2]("pareto", "smoke", "--csv", "--all", "--results", smoke[0])
    table = list(csv.DictReader(io.StringIO(proc.stdout)))
    doc = _json(smoke, "--all")
    assert [r["id"] for r in table] == [r["id"] for r in doc["rows"]]
    assert table[-1]["derived_from"] == "0" and table[0]["derived_from"] == ""
    for line, row in zip(table, doc["rows"]):
        assert float(line["fid"]) == pytest.approx(row["fid"])
        assert line["params.train.learning_rate"] == str(row["params"]["train.learning_rate"])
        assert line["artifacts.samples.png"] == row["artifacts"]["samples.png"]


def test_readme_documents_every_field_of_the_schema():
    text = Path(README).read_text()
    assert f"`schema_version` | `{rows.SCHEMA_VERSION}`" in text
    for name in rows.ROW_FIELDS:
        assert f"| `rows[].{name}` |" in text, name


def test_status_trial_in_sections_and_raw_json(smoke):
    results, _, diffnas = smoke
    text = diffnas("status", "smoke", "--trial", "0", "--results", results).stdout
    heads = [line for line in text.splitlines() if re.fullmatch(r"[a-z]+", line)]
    assert heads == ["decisions", "rungs", "attempts", "result", "timings"]
    assert re.search(r"attempt 1 on smoke-w\d, rung step 10: val_loss", text)
    assert not re.search(r"^\w+: \{", text, re.MULTILINE)  # no stage dumped as a JSON document
    raw = json.loads(diffnas("status", "smoke", "--trial", "0", "--json",
                             "--results", results).stdout)
    assert raw["id"] == "0" and raw["state"] == "COMPLETE"
    assert raw["rungs"][0]["step"] == 10 and raw["attempts"][0]["status"] == "completed"
    assert raw["finished"]["quality"]["fid_floor"] > 0 and raw["prescreen"]["params"] > 0
    derived = diffnas("status", "smoke", "--trial", "d0", "--results", results).stdout
    assert derived.startswith("trial d0: COMPLETE\nderived (compress) from trial 0")


def test_search_prints_a_dashboard_command_with_absolute_paths(smoke):
    results, search, _ = smoke
    (line,) = [x for x in search.stdout.splitlines() if x.startswith("dashboard: ")]
    assert line == (f"dashboard: uvx optuna-dashboard sqlite:///{results.resolve()}/diffnas.db "
                    f"--artifact-dir {results.resolve()}/artifacts")


def test_all_without_a_format_is_one_line_error(smoke):
    proc = smoke[2]("pareto", "smoke", "--all", "--results", smoke[0])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "diffnas: error: --all: give --json or --csv (the table shows the front)")
