"""The trial record: every stage record round-trips through a real SQLite study, format-1
trials still read, and the headline numbers are flat scalars."""

import json

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from engine.config import Config
from search.pruning.base import Cost
from search.space import load_space
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage import study as st
from workers.records import Decision, Measurement

CONFIG = Config.from_dict({"unet": {"image_size": 8, "base_width": 8, "width_mults": [1, 2],
                                    "norm_groups": 4, "time_emb_dim": 32},
                           "schedule": {"sampler": "ddim", "steps": 4},
                           "train": {"steps": 30, "batch_size": 8}})

CONVERSION = rec.Conversion("cpu:a", "cpu:b", 10.0, 20.0, 2.0,
                            extra={"predicted_ms": 1.0, "predicted_target_ms": 2.0})
RECORDS = [
    CONFIG,
    rec.prescreen(Cost(1000, 2000, 30, 12.5, "cpu:b"), Decision(False, "too big")),
    rec.measured(Measurement(20.0, 0.02, (19.0, 20.0, 21.0), 3.0, 1.5, 0.4,
                             budget={"steps": 3}, wait_share=0.04, reference_shift=1.12,
                             host_slowdown=1.3),
                 Decision(), CONVERSION),
    CONVERSION,
    rec.StepBudget({"schedule": {**CONFIG.to_dict()["schedule"], "steps": 3}}),
    rec.Inheritance({"status": "inherited", "parent": 0}),
    rec.Rungs((rec.Rung(10, 0.5, 0.6, 1.0, 0, "continue", "", ((5, 0.7), (10, 0.5))),
               rec.Rung(30, 0.4, 0.5, 3.0, 0, "prune", "dominated"))),
    rec.Attempts((rec.Attempt(0, "w0", "crashed", "SIGKILL", 1.0, 2.0),
                  rec.Attempt(1, "w1", "completed", "", 3.0, 9.0))),
    rec.Finished(reason="", feasible=True, worker="w1", node={"id": "n", "host": "h"},
                 device={"backend": "cpu"}, quality={"fid": 3.0, "fid_floor": 0.5},
                 timings={"wall_s": 8.0}, artifacts={"samples.png": "/x/samples.png"},
                 device_class="cpu:a"),
    lin.Lineage(parent=0, mutation="grow: unet.base_width 8 -> 16",
                adaptation=lin.Adaptation("grow", "plateau", 0, 10, 20, 1, 5.0)),
    rec.Derived("distill", "0", {"what": "progressive 2 steps", "stages": [1, 2]}),
]


def _stored(storage, *records, values=(3.0, 20.0, 1.5), state=TrialState.COMPLETE):
    """A trial that a real coordinator-like writer stored, read back from SQLite."""
    study = optuna.create_study(storage=st.open_storage(storage, create=True),
                                directions=["minimize"] * 3)
    trial = study.ask({"x": IntDistribution(0, 3)})
    rec.write(trial, *records)
    study.tell(trial, list(values) if state == TrialState.COMPLETE else None, state=state)
    return optuna.load_study(study_name=study.study_name, storage=storage).trials[0]


def test_every_stage_record_round_trips_through_sqlite(storage):
    r = rec.read(_stored(storage, *RECORDS))
    assert r.asked_config == CONFIG
    assert r.config.schedule.steps == 3  # the step budget's schedule is the one that ran
    assert r.prescreen == RECORDS[1] and not r.prescreen.proceed
    assert r.measured == RECORDS[2] and r.measured.measured_on == CONVERSION
    assert r.conversion == CONVERSION
    assert r.inheritance.doc == {"status": "inherited", "parent": 0}
    assert r.rungs == RECORDS[6].items and r.validation_points(0) == {10: 0.5, 30: 0.4}
    assert r.attempts == RECORDS[7].items
    assert r.finished == RECORDS[8]
    assert r.lineage == RECORDS[9] and r.lineage.depth == 1
    assert r.derived == RECORDS[10] and r.derived.summary() == "progressive 2 steps of 0"
    assert r.value("latency_ms") == 20.0 and r.predicted_latency_ms == 12.5


def test_a_record_keeps_keys_it_does_not_know():
    doc = {"latency_ms": 5.0, "latency_here_ms": 4.0, "decision": "continue"}
    assert rec.Measured.from_doc(doc).to_doc()["latency_here_ms"] == 4.0
    assert rec.Measured.from_doc(rec.Measured.from_doc(doc).to_doc()) == rec.Measured.from_doc(doc)


def test_a_format_1_trial_reads(storage):
    """What the coordinator stored before the record existed (format 1), verbatim."""
    attrs = {
        "config": CONFIG.to_dict(),
        "cost": {"params": 40489, "flops": 123, "train_steps": 30, "predicted_latency_ms": None,
                 "target_device": "", "parent": 2, "mutation": "unet.base_width 16 -> 8",
                 "decision": "continue", "reason": ""},
        "predicted_latency": {"ms": 7.5, "device_class": "cpu:x"},
        "measurement": {"latency_ms": 11.2, "latency_spread": 0.01, "train_mb": 0.9,
                        "sample_mb": 0.3, "seconds": 1.0, "budget": None,
                        "start": {"status": "fresh"}, "samples_ms": [11.0, 11.2],
                        "decision": "continue", "reason": ""},
        "rungs": [{"step": 10, "val_loss": 0.3, "train_loss": 0.4, "elapsed_s": 2.0,
                   "attempt": 0, "decision": "continue", "reason": ""}],
        "attempts": [{"attempt": 0, "worker": "w0", "status": "completed", "reason": "",
                      "started": 1.0, "ended": 5.0}],
        "quality": {"fid": 12.4, "fid_floor": 2.3}, "timings": {"wall_s": 5.5},
        "artifacts": {"samples.png": "/r/samples.png"}, "artifact_ids": {"samples.png": "a"},
        "device": {"backend": "cpu"}, "worker": "w0", "node": {"id": "n", "host": "h"},
        "feasible": True, "parent": 2, "mutation": "unet.base_width 16 -> 8",
    }
    study = optuna.create_study(storage=st.open_storage(storage, create=True),
                                directions=["minimize"] * 3)
    study.add_trial(create_trial(values=[12.4, 11.2, 0.3], user_attrs=attrs))
    r = rec.read(study.trials[0])
    assert r.config == CONFIG and r.prescreen.params == 40489
    assert r.prescreen.extra["parent"] == 2  # the old lineage copy rides along
    assert r.predicted_latency_ms == 7.5
    assert r.measured.samples_ms == (11.0, 11.2) and r.measured.memory_mb("max") == 0.9
    assert r.rungs[0].val_loss == 0.3 and r.attempts[0].worker == "w0"
    assert r.finished.quality["fid"] == 12.4 and r.finished.artifact_ids == {"samples.png": "a"}
    assert r.lineage.parent == 2 and r.feasible


def test_headline_numbers_are_flat_scalars():
    finished = rec.Finished(quality={"fid": 3.0, "fid_floor": 0.5}, device_class="cpu:a")
    flat = rec.attrs(rec.headline((3.0, 20.0, 1.5), finished, 0))
    assert flat == {"fid": 3.0, "latency_ms": 20.0, "peak_mem_mb": 1.5, "fid_floor": 0.5,
                    "parent": 0}
    assert all(isinstance(v, (int, float, str)) for v in flat.values())
    assert rec.attrs(finished)["device_class"] == "cpu:a"


def test_a_requeue_carries_the_lineage_but_not_the_links_of_its_own(storage):
    space = load_space("smoke")
    study, _, _ = st.open_study(st.open_storage(storage, create=True), "s", space)
    study.enqueue_trial({}, user_attrs=rec.attrs(lin.Lineage(
        parent=0, mutation="m", adaptation=lin.Adaptation("grow", "why", 0, 10, 20))))
    trial = study.ask(fixed_distributions=space.distributions())
    assert st.requeue(study, trial, "crash") is True
    again = next(t for t in study.trials if t.state == TrialState.WAITING)
    lineage = rec.read(again).lineage
    assert (lineage.parent, lineage.mutation, lineage.requeued_from) == (0, "m", trial.number)
    assert lineage.adaptation.at_step == 10 and not lineage.requeued
    assert rec.read(study.trials[trial.number]).lineage.requeued


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_stored_documents_are_plain_json(record):
    for value in rec.attrs(record).values():
        json.dumps(value)  # raises TypeError on anything but JSON's types (tuples are lists)


def test_a_study_from_a_newer_format_is_refused_in_one_line(storage):
    url = st.open_storage(storage, create=True)
    study, _, _ = st.open_study(url, "new", load_space("smoke"))
    assert study.user_attrs["format"] == rec.FORMAT
    study.set_user_attr("format", rec.FORMAT + 1)
    with pytest.raises(st.StudyError, match="newer than this diffnas reads"):
        st.load_existing(url, "new")
