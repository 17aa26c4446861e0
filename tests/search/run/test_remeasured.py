"""A trial whose latency was disturbed: the protocol's trust fields travel from the worker's
Measurement into the stored record (real SQLite), the re-measurement at the end of the trial
rewrites the measured record with both attempts, and status and ``pareto --json`` mark a
latency that stayed disturbed."""

from dataclasses import replace

import jsonschema
import pytest

from search import report, report_trial, rows
from search.html.gather import gather
from search.pruning.base import Cost, NoPruner
from search.run import stages
from search.run.coordinator import Coordinator
from search.run.pipeline import Flight
from search.run.pool import Worker
from search.space import load_space
from search.storage import record as rec
from search.storage import study as st
from workers.records import Decision, Measurement, Outcome, TrialOutcome, latency_attempt

FIRST = Measurement(118.0, 0.2, (110.0, 118.0, 125.0, 119.0, 121.0), 30.0, 10.0, 4.0,
                    latency_ci=0.08, latency_rounds=6, disturbed_rounds=6, reference_ratio=1.8,
                    disturbed=True, wait_share=0.31, reference_shift=1.05,
                    host_slowdown=1.25)


class Pool:
    """Finds workers by name; nothing is dispatched in these tests."""

    def __init__(self):
        self.worker = Worker("w0", actor=None)

    def find(self, name):
        return self.worker if name == "w0" else None

    def idle(self):
        return []


def _flight(tmp_path):
    space = load_space("smoke")
    storage = st.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", create=True)
    study, _, _ = st.open_study(storage, "r", space)
    coordinator = Coordinator(study, space, Pool(), None, 1, tmp_path, NoPruner(space), 10)
    ctx = coordinator.ctx
    trial = study.ask(fixed_distributions=ctx.distributions)
    flight = Flight(trial, space.decode(trial.params), Cost(1, 1))
    ctx.flights[trial.number] = flight
    return study, ctx, flight


def _finish(ctx, flight, final, conversion=None):
    assert stages.on_measured(ctx, flight, ctx.pool.worker, FIRST).proceed
    flight.conversion = conversion  # what the hardware hook's on_measured would have set
    values = {"fid": 40.0, "latency_ms": final.latency_ms, "peak_mem_mb": 30.0}
    stages.complete(ctx, flight, TrialOutcome(flight.number, 0, Outcome.COMPLETED,
                                              values=values, measurement=final, worker="w0",
                                              artifacts={"samples.png": b"png"}))


def _remeasured(second_ms, second_disturbed):
    second = replace(FIRST, latency_ms=second_ms, latency_ci=0.03, latency_rounds=2,
                     disturbed_rounds=1 if second_disturbed else 0,
                     reference_ratio=1.6 if second_disturbed else 1.02,
                     disturbed=second_disturbed)
    kept = second if not second_disturbed else FIRST
    return replace(kept, latency_attempts=(latency_attempt(FIRST, "before training", 4.0),
                                           latency_attempt(second, "after evaluation", 1.5)))


def test_a_clean_re_measurement_replaces_the_disturbed_latency(tmp_path):
    study, ctx, flight = _flight(tmp_path)
    _finish(ctx, flight, _remeasured(61.0, False))
    r = rec.read(study.get_trials()[0])
    m = r.measured
    assert (m.latency_ms, m.disturbed, m.latency_rounds, m.reference_ratio) == (61.0, False, 2, 1.02)
    assert [a["at"] for a in m.latency_attempts] == ["before training", "after evaluation"]
    assert [a["disturbed"] for a in m.latency_attempts] == [True, False]
    assert m.latency_attempts[0]["latency_ms"] == 118.0
    assert r.value("latency_ms") == 61.0
    text = report_trial.trial_text(study, 0)
    assert "DISTURBED (too few clean samples, or too wide an interval) 118 ms" in text and "after evaluation: 61 ms" in text
    assert "latency disturbed" not in text.splitlines()[0]


def test_a_latency_that_stays_disturbed_is_marked_in_status_and_pareto_rows(tmp_path):
    study, ctx, flight = _flight(tmp_path)
    _finish(ctx, flight, _remeasured(150.0, True))
    r = rec.read(study.get_trials()[0])
    assert r.measured.disturbed and r.measured.latency_ms == 118.0  # the less disturbed
    assert len(r.measured.latency_attempts) == 2
    head = report_trial.trial_text(study, 0).splitlines()[0]
    assert head == ("trial 0: COMPLETE -- latency disturbed (reference x1.8, median +-8.0%, "
                    "also when re-measured)")
    assert "latency disturbed" in report.status_text(study)
    doc = rows.document(study, report.front(study, st.stored_space(study)), everything=True)
    jsonschema.validate(doc, rows.SCHEMA)
    assert [row["latency_disturbed"] for row in doc["rows"]] == [True]
    html_rows = gather(study, tmp_path)["trials"]
    assert "latency disturbed" in html_rows[0]["reason"]


def test_the_trust_fields_round_trip_without_a_re_measurement(tmp_path):
    study, ctx, flight = _flight(tmp_path)
    stages.on_measured(ctx, flight, ctx.pool.worker, FIRST)
    stored = rec.read(study.get_trials()[0]).measured
    assert stored == rec.measured(FIRST, Decision(), flight.conversion)
    assert (stored.latency_ci, stored.latency_rounds, stored.disturbed_rounds,
            stored.reference_ratio, stored.disturbed) == (0.08, 6, 6, 1.8, True)
    assert (stored.wait_share, stored.reference_shift, stored.host_slowdown) == (0.31, 1.05, 1.25)
    assert stored.latency_attempts == ()
    trust = "\n".join(report_trial._trust_lines(stored))
    assert "waited 31% for the core" in trust and "moved the reference x1.05" in trust
    assert "at the host's usual speed (it ran x1.25: 147.5 ms as timed)" in trust


def test_an_older_measured_record_reads_with_default_trust_fields():
    old = rec.Measured.from_doc({"latency_ms": 5.0, "latency_spread": 0.01,
                                 "samples_ms": [5.0] * 5, "decision": "continue"})
    assert (old.latency_ci, old.latency_rounds, old.disturbed, old.latency_attempts) == (
        0.0, 1, False, ())
    assert not report_trial.disturbed_note(
        rec.TrialRecord(0, st.TrialState.COMPLETE, None, {}, {}, measured=old))


def test_an_older_pareto_document_without_the_new_row_field_still_validates(tmp_path):
    study, ctx, flight = _flight(tmp_path)
    _finish(ctx, flight, _remeasured(61.0, False))
    doc = rows.document(study, report.front(study, st.stored_space(study)), everything=True)
    for row in doc["rows"]:
        del row["latency_disturbed"]
    jsonschema.validate(doc, rows.SCHEMA)
    assert "latency_disturbed" in rows.to_csv(rows.rows(study, report.front(study), True))
    with pytest.raises(jsonschema.ValidationError):
        doc["rows"][0]["latency_disturbed"] = "yes"
        jsonschema.validate(doc, rows.SCHEMA)


def test_a_converted_latency_measured_again_is_converted_again(tmp_path):
    # The told latency and the conversion record must name the same (kept) latency.
    study, ctx, flight = _flight(tmp_path)
    conversion = rec.Conversion("cpu:a", "cpu:b", FIRST.latency_ms, 2 * FIRST.latency_ms, 2.0)
    _finish(ctx, flight, _remeasured(61.0, False), conversion)
    trial = study.get_trials()[0]
    doc = trial.user_attrs[rec.CONVERSION]
    assert (doc["measured_ms"], doc["latency_ms"]) == (61.0, 122.0)
    assert trial.values[1] == pytest.approx(doc["latency_ms"])
    assert trial.user_attrs[rec.MEASURED]["latency_ms"] == pytest.approx(doc["latency_ms"])
