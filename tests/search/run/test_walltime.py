"""A real search stores each trial's wall-time breakdown and each worker's own costs, and
``diffnas status`` shows them; a study stored before the breakdown existed still reads."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search import report, report_trial, walltime
from search.storage import record as rec
from search.storage import timing as stored_time
from workers.records import WALL_PHASES, WallTime

LEARNING_RATE = "{ float = [1e-3, 3e-3], log = true }"  # a space must search something


def test_a_search_stores_the_breakdown_and_status_shows_it(tiny_search):
    _, study = tiny_search("spent", {"study": {"trials": "1"},
                                     "train": {"steps": "20", "learning_rate": LEARNING_RATE}})
    [trial] = study.get_trials()
    r = rec.read(trial)
    assert r.state is TrialState.COMPLETE and r.walltime is not None
    wall = r.walltime
    assert all(v >= 0 for v in wall.phases().values())
    assert sum(wall.phases().values()) == pytest.approx(wall.wall_s, rel=1e-6)
    assert wall.wall_s <= r.finished.timings["wall_s"]  # dispatch to record, within ask to tell
    assert wall.mode in ("spawn", "fork") and wall.train_s > 0 and wall.fid_s > 0
    assert 1 <= r.measured.latency_rounds <= 2  # the tiny space's [evaluate] latency_rounds
    [worker] = stored_time.read_workers(study)
    assert worker.worker == r.finished.worker and worker.started_at > 0
    assert worker.mode == wall.mode and worker.actor_start_s > 0
    status = report.status_text(study)
    assert "wall time: 1 trials" in status and "workers busy" in status
    assert "wall time\n" in report_trial.trial_text(study, trial.number)


def _study(*walls):
    study = optuna.create_study(directions=["minimize"] * 3)
    for i, wall in enumerate(walls):
        attrs = rec.attrs(rec.Attempts((rec.Attempt(0, "w0", "completed", "", 100.0 + 10 * i,
                                                    110.0 + 10 * i),)))
        if wall is not None:
            attrs.update(rec.attrs(wall))
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[1.0, 2.0, 3.0],
                                     user_attrs=attrs))
    return study


def test_the_summary_adds_phases_over_trials_and_over_the_workers_time():
    wall = WallTime(start_s=1.0, train_s=6.0, fid_s=1.0, latency_s=1.0, write_s=1.0,
                    wall_s=10.0, queued_s=0.5, mode="fork")
    study = _study(wall, wall, None)
    stored_time.write_worker(study, stored_time.WorkerTime("w0", started_at=95.0, actor_start_s=2.0))
    s = walltime.summarize(study)
    assert s.trials == 2 and s.phases["train_s"] == 12.0 and s.wall_s == 20.0
    assert s.overhead_share == pytest.approx(0.3)  # (20 - 12 - 2) / 20
    assert s.study_wall_s == 35.0 and s.busy_share == pytest.approx(20.0 / 35.0)
    assert "overhead 30%" in walltime.summary_line(s) and "busy 57% of 1 x 35 s" in \
        walltime.summary_line(s)
    assert "| **trial wall** | 10.00 | 100% |" in walltime.table(s)


def test_a_study_stored_before_the_breakdown_reads_without_it():
    study = _study(None)
    [trial] = study.get_trials()
    assert rec.read(trial).walltime is None and walltime.summarize(study) is None
    assert "wall time" not in report.status_text(study)
    assert "wall time" not in report_trial.trial_text(study, trial.number)


def test_a_stored_breakdown_round_trips_and_ignores_keys_it_does_not_know():
    wall = WallTime(train_s=2.0, wall_s=3.0, other_s=1.0, mode="spawn")
    doc = {**rec.attrs(wall)[stored_time.WALLTIME], "newer_phase_s": 4.0}
    assert stored_time.read_walltime(doc) == wall
    assert set(rec.attrs(wall)[stored_time.WALLTIME]) >= set(WALL_PHASES)


def test_idle_is_split_into_the_coordinator_answers_and_the_device_lock():
    wall = WallTime(train_s=6.0, idle_s=3.0, answers_s=0.5, wall_s=9.0, mode="fork")
    s = walltime.summarize(_study(wall, wall))
    assert s.answers_s == 1.0 and s.phases["idle_s"] == 6.0
    assert "(idle: coordinator answers 1, device lock 5)" in walltime.summary_line(s)
    assert "| of idle: coordinator answers | 0.50 | 5.6% |" in walltime.table(s)
    lines = walltime.trial_lines(wall)
    assert "idle: coordinator answers 0.50 s, device lock 2.50 s" in lines[1]
