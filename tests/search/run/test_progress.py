"""Progress output: plain lines off a terminal, a redrawn block on one."""

import io
import time

import numpy as np

from engine.data.datasets import Dataset
from engine.quality.features import feature_network_for
from search.pruning.base import Cost, NoPruner
from search.run.coordinator import Coordinator
from search.run.pipeline import Flight
from search.run.pool import Worker
from search.run.progress import (
    LiveDisplay,
    LogLines,
    RunningTrial,
    Silent,
    Snapshot,
    Step,
    for_stream,
    setup_step,
    summary_line,
)
from search.space import load_space
from search.storage import study as st


def _snapshot(complete, messages=()):
    running = (RunningTrial(5, 0, "demo-w0", "training", 123, 45, "n0", 12.0),)
    return Snapshot("demo", 12, complete, 1, 0, running, 0, 2, 3, 42.5, 65.0, 130.0,
                    tuple(messages))


def test_log_lines_print_messages_and_changes_only():
    out = io.StringIO()
    progress = LogLines(out)
    progress.update(_snapshot(2, ["trial 4 complete: fid 12"]))
    progress.update(_snapshot(2))  # nothing changed: no new line
    progress.update(_snapshot(3))
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial 4 complete: fid 12"
    assert len(lines) == 3 and "3/12 finished" in lines[1] and "4/12 finished" in lines[2]
    assert "front 3, HV 42.5" in lines[1] and "ETA 2:10" in lines[1]


def test_live_display_redraws_in_place():
    out = io.StringIO()
    display = LiveDisplay(out, interval_s=0.0)
    display.update(_snapshot(2))
    display.update(_snapshot(3, ["trial 6 complete"]))
    text = out.getvalue()
    assert "\x1b[2F\x1b[J" in text  # moved up over the 2-line block and cleared it
    assert "trial    5 try 1  training" in text and "trial 6 complete" in text


def test_plain_lines_when_not_a_terminal():
    assert isinstance(for_stream(io.StringIO()), LogLines)


def test_summary_says_running_and_queued_apart():
    line = summary_line(Snapshot("demo", 12, 2, 0, 0, (), 1, 2, 1, 1.0, 5.0, None, (), 1))
    assert "running 0, queued 1 on 2 workers (1 starting" in line


class FakePool:
    """Two started workers that take any trial (the coordinator's side only)."""

    def __init__(self):
        self.workers = {n: Worker(n, actor=None) for n in ("A", "B")}

    def idle(self):
        return [w for w in self.workers.values() if w.idle]

    def find(self, name):
        return self.workers.get(name)

    def dispatch(self, worker, request, data_ref):
        worker.trial, worker.attempt = request.number, request.attempt

    def starting(self):
        return 0


def test_a_queued_retry_is_not_counted_as_running(tmp_path):
    space = load_space("smoke")
    storage = st.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", create=True)
    study, _, _ = st.open_study(storage, "c", space)
    coordinator = Coordinator(study, space, FakePool(), None, 1, tmp_path, NoPruner(space), 10)
    coordinator._fill()  # A and B each run a fresh trial
    trial = study.ask(fixed_distributions=coordinator.ctx.distributions)
    retry = Flight(trial, space.decode(trial.params), Cost(1, 1), attempt=1)
    coordinator.ctx.flights[trial.number] = retry  # its worker died: it waits for another
    coordinator.ctx.queue.append(retry)
    snap = coordinator.snapshot()
    assert (len(snap.running), snap.queued, snap.workers) == (2, 1, 2)
    assert "running 2, queued 1 on 2 workers" in summary_line(snap)


def test_setup_steps_show_start_progress_and_end_off_a_terminal():
    out = io.StringIO()
    progress = LogLines(out)
    with setup_step(progress, "quick"):
        pass  # under 2 s: nothing to say
    with Step(out, "starting Ray", after_s=0.01):
        time.sleep(0.2)
    with setup_step(progress, "cached network", lazy=True):
        pass  # a cache hit: nothing to say
    with setup_step(progress, "training", lazy=True) as step:
        for done in range(1, 9):
            step.advance(done, 8)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["starting Ray ...", lines[1]] and lines[1].startswith("starting Ray: done")
    assert [x for x in lines if "cached" in x or "quick" in x] == []
    assert lines[2:-1] == ["training: 1/8", "training: 2/8", "training: 4/8", "training: 6/8",
                           "training: 8/8"]
    assert lines[-1].startswith("training: done in ")
    with setup_step(Silent(), "quiet") as step:  # a progress that shows no steps
        step.advance(1, 2)


def test_feature_network_training_reports_every_step(tmp_path):
    images = np.random.default_rng(0).random((64, 16, 16, 1), np.float32)
    seen = []
    feature_network_for(Dataset(images, None, "noise", False), tmp_path, steps=3,
                        on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    feature_network_for(Dataset(images, None, "noise", False), tmp_path, steps=3,
                        on_step=lambda done, total: seen.append((done, total)))
    assert seen == []  # cached: no training, no progress
