"""Coordinator scheduling without a cluster: a stand-in pool records what is dispatched."""

import optuna

from search.pruning.base import Cost, NoPruner
from search.run.coordinator import Coordinator
from search.run.pipeline import Flight, Phase
from search.run.pool import Worker
from search.space import load_space
from search.storage import study as st


class FakePool:
    def __init__(self, names):
        self.workers = {n: Worker(n, actor=None) for n in names}
        self.sent = []

    def idle(self):
        return [w for w in self.workers.values() if w.idle]

    def find(self, name):
        return self.workers.get(name)

    def dispatch(self, worker, request, data_ref):
        assert worker.idle
        worker.trial, worker.attempt = request.number, request.attempt
        self.sent.append((worker.name, request.number, request.attempt))


def _coordinator(tmp_path, names, target=10):
    space = load_space("smoke")
    storage = st.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", create=True)
    study, _, _ = st.open_study(storage, "c", space)
    pool = FakePool(names)
    return Coordinator(study, space, pool, None, 1, tmp_path, NoPruner(space), target), pool


def _retry(coordinator, avoid):
    ctx = coordinator.ctx
    trial = coordinator.study.ask(fixed_distributions=ctx.distributions)
    run = Flight(trial, coordinator.space.decode(trial.params), Cost(1, 1), attempt=1,
                 avoid=frozenset(avoid))
    ctx.flights[trial.number] = run
    ctx.queue.append(run)
    return run


def test_retry_skips_the_worker_it_crashed_on_and_nobody_idles(tmp_path):
    coordinator, pool = _coordinator(tmp_path, ["A", "B"])
    run = _retry(coordinator, avoid={"A"})
    coordinator._fill()
    assert ("B", run.number, 1) in pool.sent  # the retry went to B ...
    assert [s for s in pool.sent if s[0] == "A"] != []  # ... and A got a fresh trial
    assert run.phase is Phase.STARTING and not coordinator.ctx.queue


def test_retry_runs_anywhere_once_every_worker_has_crashed_it(tmp_path):
    coordinator, pool = _coordinator(tmp_path, ["A", "B"])
    run = _retry(coordinator, avoid={"A", "B"})
    coordinator._fill()
    assert pool.sent[0] == ("A", run.number, 1)


def test_never_more_trials_in_flight_than_the_target_allows(tmp_path):
    coordinator, pool = _coordinator(tmp_path, ["A", "B", "C"], target=2)
    coordinator._fill()
    assert len(pool.sent) == 2 and len({n for _, n, _ in pool.sent}) == 2
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in coordinator.study.trials)
