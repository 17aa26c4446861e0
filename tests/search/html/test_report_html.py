"""``diffnas report``: one self-contained HTML file of a real smoke study, checked against the
study itself and opened in a real browser (Debian's chromium, driven by Playwright)."""

import io
import json
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from optuna.trial import TrialState

from search import cli, report
from search.html.gather import curve, timeline
from search.storage import record as rec
from search.storage import study as st

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/report-screenshot.png")


def diffnas(*args):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def smoke(smoke_study):
    """The session's smoke study (``tests/search/conftest.py``: a real ``diffnas search
    --preset smoke`` with a compressed d0) and its report.
    Returns ``(results, study, report path, the report command's output)``."""
    results = smoke_study[0]
    with redirect_stdout(io.StringIO()) as stdout:  # run in this process: no interpreter start
        assert cli.main(["report", "smoke", "--results", str(results)]) == 0
    study = st.load_existing(st.open_storage(st.default_storage(results), create=False), "smoke")
    return results, study, results / "smoke" / "report.html", stdout.getvalue()


class _Loads(HTMLParser):
    """Every ``src``/``href`` of the page's own tags (script bodies are not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _document(html):
    match = re.search(r'<script type="application/json" id="data">(.*?)</script>', html,
                      re.DOTALL)
    return json.loads(match.group(1))


def test_the_file_is_self_contained_and_small(smoke):
    _, _, path, stdout = smoke
    assert f"wrote {path} (" in stdout and " MB) in " in stdout
    html = path.read_text()
    parser = _Loads()
    parser.feed(html)
    assert parser.urls == []  # no external script, style, image or link
    assert html.count("<script") == 3  # the library, the data, the page's code: all inline
    assert path.stat().st_size < 5_000_000


def test_the_document_matches_the_study(smoke):
    _, study, path, _ = smoke
    doc = _document(path.read_text())
    front = report.front(study, st.stored_space(study))
    rows = {r["label"]: r for r in doc["trials"]}
    assert sorted(rows) == sorted([*(str(t.number) for t in study.trials), "d0"])
    assert sorted(rows) == sorted(front.labels)  # the search's trials and the derived d0
    for label, t in zip(front.labels, front.trials):
        row, r = rows[label], rec.read(t)
        assert [row["values"][k] for k in doc["objectives"]] == pytest.approx(t.values)
        assert row["params"] == t.params and row["fid_floor"] == r.finished.quality["fid_floor"]
        assert row["thumb"].startswith("data:image/webp;base64,")
        assert row["on_front"] == bool(front.on_front[front.labels.index(label)])
        if label.startswith("d"):
            continue  # a derived point has no training curve of its own
        curve = next(c for c in doc["curves"] if c["label"] == label)
        assert dict(map(tuple, curve["points"])) == {
            **{s: v for g in r.rungs for s, v in g.history}, **r.validation_points()}
    assert doc["hypervolume_over_time"][-1]["hypervolume"] == pytest.approx(front.hypervolume)
    attempts = sum(len(rec.read(t).attempts) for t in study.trials)
    assert sum(len({s["trial"] for s in lane["segments"] if s["trial"]})
               for lane in doc["timeline"]) == attempts


def test_timeline_splits_attempts_into_phases_and_idle_gaps():
    timings = {"measure_s": 1.0, "train_s": 4.0, "eval_s": 1.0, "wall_s": 9.0}
    first = rec.TrialRecord(0, TrialState.COMPLETE, None, {}, {},
                            attempts=(rec.Attempt(0, "w0", "completed", "", 100.0, 108.0),),
                            finished=rec.Finished(timings=timings))
    second = rec.TrialRecord(1, TrialState.FAIL, None, {}, {},
                             attempts=(rec.Attempt(0, "w0", "died", "killed", 110.0, 112.0),))
    (lane,) = timeline([(first, "0"), (second, "1")], t0=100.0)
    spans = {(s["trial"], s["phase"]): (s["start"], s["end"]) for s in lane["segments"]}
    assert spans == {("0", "setup"): (0.0, 2.0), ("0", "measure"): (2.0, 3.0),
                     ("0", "train"): (3.0, 7.0), ("0", "eval"): (7.0, 8.0),
                     ("1", "attempt"): (10.0, 12.0), ("", "idle"): (8.0, 10.0)}
    assert lane["busy"] == pytest.approx(10.0 / 12.0)


def test_a_curve_is_the_last_attempt_with_its_stops():
    def rung(step, loss, attempt, history, decision="continue", reason=""):
        return rec.Rung(step, loss, attempt=attempt, history=history, decision=decision,
                        reason=reason)

    r = rec.TrialRecord(4, TrialState.PRUNED, None, {}, {}, rungs=(
        rung(10, 0.9, 0, ((10, 0.9),)),  # the first attempt crashed: not on the curve
        rung(10, 0.8, 1, ((5, 0.85), (10, 0.8))),
        rung(20, 0.7, 1, ((15, 0.75), (20, 0.7)), "prune", "worse than 2 of 3 at rung 20")))
    c = curve(r, "4")
    assert c["points"] == [(5, 0.85), (10, 0.8), (15, 0.75), (20, 0.7)]
    assert c["rungs"] == [10, 20]
    assert c["stops"] == [{"step": 20, "val_loss": 0.7, "decision": "prune",
                           "reason": "worse than 2 of 3 at rung 20"}]


def test_unknown_study_or_storage_is_one_line(smoke, tmp_path, capsys):
    results = smoke[0]
    done = diffnas("report", "nope", "--results", results)  # the real process
    in_process = cli.main(["report", "smoke", "--storage", "sqlite:////no/such/dir/x.db"])
    for (code, err), fragment in (((done.returncode, done.stderr), "unknown study 'nope'"),
                                  ((in_process, capsys.readouterr().err), "no study storage at")):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("diffnas: error: ") and fragment in lines[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no chromium at {CHROMIUM} "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_in_a_browser_a_click_shows_the_point_and_the_table_sorts(smoke):
    from playwright.sync_api import sync_playwright

    _, study, path, _ = smoke
    started = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _check_page(page, path, study)
        finally:
            browser.close()
    print(f"browser test: {time.perf_counter() - started:.1f} s")


def _check_page(page, path, study):
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    front = next(t for t in study.trials if t.number == _front_trial(study))
    _click_point(page, front)
    detail = page.locator("#detail")
    assert detail.get_attribute("data-label") == str(front.number)
    assert detail.locator("img.samples").get_attribute("src").startswith("data:image/webp")
    rows = detail.locator("table.params tr").evaluate_all(
        "trs => trs.map(tr => [...tr.cells].map(td => td.innerText))")
    shown = dict(rows)
    assert sorted(shown) == sorted(front.params)
    for key, value in front.params.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        assert (float(shown[key]) == pytest.approx(value, rel=1e-3) if number
                else shown[key].lower() == str(value).lower())
    assert "FID floor" in detail.inner_text()
    _check_comparison(page, study, front)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    _check_sorting(page, study)
    _check_filter(page, study)
    assert errors == [] and all(u.startswith(("file:", "data:")) for u in requests), requests


def _front_trial(study):
    front = report.front(study, st.stored_space(study))
    return int(front.labels[int(np.flatnonzero(front.on_front)[0])])


def _click_point(page, trial):
    """A real mouse click where the FID-latency scatter draws ``trial``."""
    x, y = page.evaluate("([fid, lat]) => window.diffnas.charts['scatter-0']"
                         ".convertToPixel({gridIndex: 0}, [fid, lat])", trial.values[:2])
    box = page.locator("#scatter-0").bounding_box()
    page.mouse.click(box["x"] + x, box["y"] + y)


def _check_sorting(page, study):
    front = report.front(study, st.stored_space(study))  # the trials and the derived d0
    page.locator('#trials th[data-key="fid"]').click()
    column = _column(page, "fid")
    shown = [float(page.locator(f"#trials tbody tr:nth-child({i + 1}) td:nth-child({column})")
                   .inner_text()) for i in range(len(front.labels))]
    assert shown == sorted(shown) and len(set(shown)) > 1
    page.locator('#trials th[data-key="fid"]').click()
    order = page.locator("#trials tbody tr").evaluate_all("rows => rows.map(r => r.dataset.label)")
    by_fid = sorted(zip(front.labels, front.trials), key=lambda pair: -pair[1].values[0])
    assert order == [label for label, _ in by_fid]


def _column(page, key):
    keys = page.locator("#trials th").evaluate_all("ths => ths.map(th => th.dataset.key)")
    return keys.index(key) + 1


def _check_comparison(page, study, first):
    """"compare" on the shown point, then a shift-click on another: two columns."""
    page.locator("#add-compare").click()
    span = np.ptp([t.values[:2] for t in study.trials], axis=0) + 1e-12
    other = max(study.trials, key=lambda t: float(np.sum(  # the farthest: no overlap
        np.abs(np.subtract(t.values[:2], first.values[:2])) / span)))
    page.keyboard.down("Shift")
    _click_point(page, other)
    page.keyboard.up("Shift")
    heads = page.locator("#compare table.compare th").all_inner_texts()
    assert heads[1:] == [f"trial {first.number}", f"trial {other.number}"]
    assert page.locator("#compare img.samples").count() == 2


def _check_filter(page, study):
    worker = rec.read(study.trials[0]).finished.worker
    page.locator("#filter").fill(worker)
    shown = page.locator("#trials tbody tr").evaluate_all("rows => rows.map(r => r.dataset.label)")
    assert sorted(shown) == sorted(str(t.number) for t in study.trials
                                   if rec.read(t).finished.worker == worker)
