"""Reports on a synthetic study: status reasons, the Pareto table and the plot."""

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search import plot, report, report_trial
from search.space import load_space
from search.storage import record as rec
from search.storage import study as st


@pytest.fixture()
def study(storage):
    space = load_space("smoke")
    s, _, _ = st.open_study(st.open_storage(storage, create=True), "r", space)
    s.set_user_attr("target", 6)
    dist = space.distributions()
    params = {k: d.to_external_repr(0) if hasattr(d, "choices") else d.low
              for k, d in dist.items()}
    params["schedule.steps"] = 2

    def add(values, state=TrialState.COMPLETE, reason="", infeasible=False):
        attrs = {rec.REASON: reason} if reason else {}
        attrs[rec.ATTEMPTS] = [{"attempt": 0, "worker": "w0", "status": "completed",
                               "reason": "", "started": 0.0, "ended": 10.0}]
        attrs[rec.TIMINGS] = {"wall_s": 10.0}
        system = {"constraints:latency_ms": 0.5 if infeasible else -0.5}
        s.add_trial(create_trial(state=state, values=values, params=params, distributions=dist,
                                 user_attrs=attrs, system_attrs=system))

    add([10.0, 5.0, 1.0])
    add([20.0, 2.0, 1.0])
    add([30.0, 6.0, 2.0])  # dominated by the first
    add([5.0, 50.0, 9.0], infeasible=True)  # best FID but over the latency limit
    add(None, TrialState.PRUNED, "dominated at rung 10")
    add(None, TrialState.FAIL, "gave up after 3 attempts; last: killed by SIGKILL")
    return s


def test_status_lists_states_workers_and_reasons(study):
    text = report.status_text(study)
    assert "6/6 finished (complete 4, pruned 1, failed 1)" in text
    assert "dominated at rung 10" in text and "killed by SIGKILL" in text
    assert "w0" in text and "360" in text  # 6 trials in 60 busy seconds = 360/h


def test_front_excludes_dominated_and_infeasible(study, tmp_path):
    front = report.front(study, reference=(100.0, 100.0, 10.0))
    numbers = [t.number for t, on in zip(front.trials, front.on_front) if on]
    assert numbers == [0, 1]
    assert not front.feasible[3]
    # Two boxes: (90*95*9) + (80*98*9) - overlap (80*95*9).
    assert front.hypervolume == pytest.approx(90 * 95 * 9 + 80 * 98 * 9 - 80 * 95 * 9)
    text = report.pareto_text(front)
    assert "2 non-dominated of 4 complete trials (1 infeasible)" in text
    png = plot.plot_front(front, tmp_path / "front.png", "r")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_trial_text_explains_a_prune(study):
    assert "PRUNED -- dominated at rung 10" in report_trial.trial_text(study, 4)
    with pytest.raises(st.StudyError, match="no trial 99"):
        report_trial.trial_text(study, 99)


def test_eta_needs_running_trials(study):
    assert report.eta_s(study) is None
    assert isinstance(study, optuna.Study)


def test_differing_names_every_parameter_not_equal_on_all_rows():
    rows = [{"unet.base_width": 16, "train.learning_rate": 1e-3, "schedule.steps": 2},
            {"unet.base_width": 16, "train.learning_rate": 2e-3, "schedule.steps": 2},
            {"unet.base_width": 16, "train.learning_rate": 1e-3}]
    assert report.differing(rows) == ["schedule.steps", "train.learning_rate"]
    assert report.differing(rows[:1]) == [] and report.differing([rows[0], rows[0]]) == []
    assert report.short_names(["unet.steps", "schedule.steps", "train.learning_rate"]) == {
        "unet.steps": "unet.steps", "schedule.steps": "schedule.steps",
        "train.learning_rate": "learning_rate"}


def test_front_rows_that_read_alike_show_the_parameter_that_differs(study):
    front = report.front(study, reference=(100.0, 100.0, 10.0))
    text = report.pareto_text(front)
    # trials 0 and 1 share every parameter: nothing tells them apart but their values
    assert "differs" in text.splitlines()[1]
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, values=[1.0, 90.0, 9.5],
        params={**study.trials[0].params, "train.learning_rate": 0.00234},
        distributions=study.trials[0].distributions))
    text = report.pareto_text(report.front(study, reference=(100.0, 100.0, 10.0)))
    row = next(line for line in text.splitlines() if line.startswith("6 "))
    assert "learning_rate=0.00234" in row and "learning_rate=0.001 " in text


def test_dashboard_command_pastes_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = report.dashboard_command("sqlite:///results/diffnas.db", Path("results/artifacts"))
    assert command == (f"uvx optuna-dashboard sqlite:///{tmp_path}/results/diffnas.db "
                       f"--artifact-dir {tmp_path}/results/artifacts")
    command = report.dashboard_command("postgresql://u:pw@h/db", Path("/a b/artifacts"))
    assert command == ("uvx --with 'psycopg[binary]' optuna-dashboard 'postgresql://u:***@h/db' "
                       "--artifact-dir '/a b/artifacts'")
    assert "pw" not in command


def test_labels_of_coincident_points_do_not_overlap(study):
    for fid in (10.0, 10.001, 10.002, 9.999):  # "6", "7", ... on top of trial 0's point
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[fid, 5.0 - fid / 1e3, 1.0],
                                     params=study.trials[0].params,
                                     distributions=study.trials[0].distributions))
    front = report.front(study, reference=(100.0, 100.0, 10.0))
    assert front.on_front.sum() >= 4
    fig = plot.draw_front(front, "r")
    for boxes in plot.label_boxes(fig):
        assert len(boxes) == int(front.on_front.sum())
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    front_lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(front_lines) == 3  # one front (staircase) per panel
