"""Study storage, create-or-resume and stale-trial recovery, on real Optuna SQLite."""

import multiprocessing

import optuna
import pytest
from optuna.trial import TrialState

from search.space import load_space, parse_space
from search.storage import lineage as lin
from search.storage import record as rec
from search.storage import study as st


@pytest.fixture()
def space():
    return load_space("smoke")


def _open(storage, space, name="s"):
    return st.open_study(st.open_storage(storage, create=True), name, space)


def test_create_then_resume_keeps_space_sampler_and_seed(storage, space):
    study, _, resumed = _open(storage, space)
    assert not resumed and study.metric_names == ["fid", "latency_ms", "peak_mem_mb"]
    assert [d.name for d in study.directions] == ["MINIMIZE"] * 3
    again, stored, resumed = _open(storage, None)
    assert resumed and stored.fingerprint() == space.fingerprint()
    assert again.user_attrs["sampler"] == "tpe" and again.user_attrs["seed"] == 0


def test_resume_with_a_different_space_is_refused(storage, space):
    _open(storage, space)
    other = parse_space(space.source.replace("batch_size = 8", "batch_size = 16"))
    with pytest.raises(st.StudyError, match="different search space"):
        _open(storage, other)
    with pytest.raises(st.StudyError, match="drop --sampler"):
        st.open_study(st.open_storage(storage, create=True), "s", None, sampler="nsga2")


def test_a_study_whose_creator_stopped_before_its_space_is_set_up_on_resume(storage, space):
    # What a coordinator SIGKILLed between creating the study and writing its space leaves
    # (benchmarks/faults.py found it): the study exists, with no attributes.
    optuna.create_study(storage=st.open_storage(storage, create=True), study_name="s",
                        directions=["minimize"] * 3)
    with pytest.raises(st.StudyError, match="never set up"):
        _open(storage, None)
    study, stored, resumed = _open(storage, space)
    assert not resumed and stored.fingerprint() == space.fingerprint()
    assert study.user_attrs["sampler"] == "tpe" and "created" in study.user_attrs
    assert study.metric_names == ["fid", "latency_ms", "peak_mem_mb"]
    assert _open(storage, None)[2]  # whole now: resumed by name


def _ask_running(study, space, n):
    return [study.ask(fixed_distributions=space.distributions()) for _ in range(n)]


def test_stale_running_trials_fail_and_requeue_exactly_once(storage, space):
    study, _, _ = _open(storage, space)
    done, stale_a, stale_b = _ask_running(study, space, 3)
    study.tell(done, [1.0, 2.0, 3.0])
    # A new coordinator (the old one was killed) opens the same study.
    study, _, _ = _open(storage, None)
    assert sorted(st.recover_stale(study, st.open_storage(storage, create=False))) == [stale_a.number, stale_b.number]
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[lin.REQUEUED_FROM] for t in waiting) == [stale_a.number,
                                                                        stale_b.number]
    assert st.finished_count(study) == 1  # requeued FAILs do not count toward the target
    # The re-queued trial runs with the same params ... and the coordinator dies again.
    rerun = study.ask(fixed_distributions=space.distributions())
    assert rerun.params == stale_a.params and rerun.user_attrs[lin.REQUEUED_FROM] == stale_a.number
    study, _, _ = _open(storage, None)
    assert st.recover_stale(study, st.open_storage(storage, create=False)) == [rerun.number]
    requeued_from = [t.user_attrs.get(lin.REQUEUED_FROM) for t in study.get_trials()]
    # The second coordinator death on these params is the last (st.MAX_DEATHS = 2).
    assert requeued_from.count(stale_a.number) == 1 and requeued_from.count(rerun.number) == 0
    final = study.get_trials()[rerun.number]
    assert final.state == TrialState.FAIL and st.is_finished(final)
    assert "2 times on these params" in rec.read(final).reason
    assert st.recover_stale(study, st.open_storage(storage, create=False)) == []


def test_requeue_is_idempotent_for_one_trial(storage, space):
    study, _, _ = _open(storage, space)
    (trial,) = _ask_running(study, space, 1)
    study.enqueue_trial(dict(trial.params), user_attrs={lin.REQUEUED_FROM: trial.number})
    assert st.requeue(study, trial, "crash between enqueue and fail") is False
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == 1


@pytest.mark.parametrize("url, message", [
    ("postgresql://nobody@127.0.0.1:1/none", "cannot open storage postgresql://"),
    ("nosuchdb://x", "cannot open storage nosuchdb://x"),
    ("sqlite:////proc/no/such/dir/x.db", "cannot open storage"),
])
def test_bad_storage_urls_give_one_line(url, message):
    with pytest.raises(st.StudyError) as err:
        st.open_storage(url, create=not url.startswith("sqlite"))
    assert message in str(err.value) or "no study storage" in str(err.value)
    assert "\n" not in str(err.value)


def test_reading_verbs_never_create_storage(results, storage):
    with pytest.raises(st.StudyError, match="no study storage"):
        st.open_storage(storage, create=False)
    assert not results.exists()


def test_unknown_study_names_the_known_ones(storage, space):
    _open(storage, space, name="alpha")
    with pytest.raises(st.StudyError, match="unknown study 'beta' .*alpha"):
        st.load_existing(st.open_storage(storage, create=False), "beta")


def test_resumed_sampler_seed_depends_on_history(space):
    import optuna

    def first_params(n_existing):
        sampler = st.make_sampler(space, "tpe", 0, n_existing)
        study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
        return study.ask(fixed_distributions=space.distributions()).params

    assert first_params(0) == first_params(0) != first_params(5) == first_params(5)
    assert type(st.make_sampler(space, "nsga2", 0, 0)).__name__ == "NSGAIISampler"


def test_journal_file_storage(tmp_path, space):
    url = f"journal:{tmp_path / 'studies.log'}"
    study, _, _ = st.open_study(st.open_storage(url, create=True), "j", space)
    study.tell(study.ask(fixed_distributions=space.distributions()), [1.0, 2.0, 3.0])
    again = st.load_existing(st.open_storage(url, create=False), "j")
    assert st.finished_count(again) == 1


def test_a_requeued_mutation_child_keeps_its_parent(storage, space):
    study, _, _ = _open(storage, space)
    parent = _ask_running(study, space, 1)[0]
    study.tell(parent, [1.0, 2.0, 3.0])
    study.enqueue_trial(dict(parent.params), user_attrs={lin.PARENT: parent.number,
                                                         lin.MUTATION: "unet.base_width 8 -> 16"})
    child = study.ask(fixed_distributions=space.distributions())
    study, _, _ = _open(storage, None)  # the coordinator died while the child ran
    assert st.recover_stale(study, st.open_storage(storage, create=False)) == [child.number]
    again = next(t for t in study.get_trials() if t.state == TrialState.WAITING)
    assert again.user_attrs[lin.PARENT] == parent.number
    assert again.user_attrs[lin.MUTATION] == "unet.base_width 8 -> 16"


def _open_at_once(url, barrier, errors):
    barrier.wait()
    try:
        st.open_storage(url, create=True)
    except st.StudyError as err:
        errors.put(str(err))


def test_processes_creating_one_new_sqlite_file_at_once_all_open_it(tmp_path):
    # Two coordinators started together on a new file both created its tables, and one
    # failed on alembic's version row (a CI run of test_one_coordinator caught it).
    ctx = multiprocessing.get_context("fork")
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'race{attempt}' / 'diffnas.db'}"
        barrier, errors = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, errors))
                 for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert errors.empty(), errors.get()
