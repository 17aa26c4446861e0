"""Fixtures of the search tests."""

import subprocess
import sys
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search import cli
from search.storage import record as rec
from search.storage import study as st


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """``(results folder, the search's CompletedProcess)``: one real ``diffnas search --preset
    smoke`` (its own process, its own embedded Ray) plus ``diffnas compress smoke 0`` (a
    derived point ``d0``), run once per session for the tests that only read a finished
    study (the CLI's outputs, the HTML report)."""
    def diffnas(*args):
        return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=600, check=False)

    results = tmp_path_factory.mktemp("smoke") / "results"
    search = diffnas("search", "--preset", "smoke", "--study", "smoke", "--results", results)
    assert search.returncode == 0, search.stderr[-2000:]
    # every method's levels, each pruning level fine-tuned 5 steps on the study's data (the
    # default 100 steps only move d0's FID, which no reader of the study checks)
    derived = diffnas("compress", "smoke", "0", "--max-fid-increase", "1000%",
                      "--finetune-steps", "5", "--results", results)
    assert derived.returncode == 0, derived.stderr[-2000:]
    return results, search


@pytest.fixture()
def in_process(capsys):
    """``in_process(*args)``: ``diffnas *args`` run by ``search.cli.main`` in this process (the
    real command's code without an interpreter start), with ``returncode``, ``stdout`` and
    ``stderr`` as a finished subprocess has them."""
    def run(*args):
        code = cli.main([str(a) for a in args])
        shown = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=shown.out, stderr=shown.err)
    return run


@pytest.fixture()
def stored_trials():
    """``stored_trials(events)``: pruned trials holding what the coordinator stores for a
    pruner to restore from -- ``measurement`` and ``rungs`` -- one per event
    ``(latency, memory, [(rung step, val loss), ...])``."""

    def make(events):
        study = optuna.create_study(directions=["minimize"] * 3)
        for latency, memory, proxies in events:
            m = {"latency_ms": latency, "train_mb": memory, "sample_mb": memory,
                 "samples_ms": [], "decision": "continue", "reason": ""}
            rungs = [{"step": s, "val_loss": v, "train_loss": v, "elapsed_s": 1.0, "attempt": 0,
                      "decision": "continue", "reason": ""} for s, v in proxies]
            study.add_trial(create_trial(state=TrialState.PRUNED,
                                         user_attrs={rec.MEASURED: m, rec.RUNGS: rungs}))
        return study.get_trials()

    return make


TINY = {"data": {"image_size": "8"}, "study": {"trials": "2", "startup_trials": "2"},
        "evaluate": {"fid_samples": "16", "grid_images": "4", "latency_rounds": "2"},
        "unet": {"base_width": "8", "width_mults": "[1, 2]", "norm_groups": "4",
                 "time_emb_dim": "32"},
        "train": {"batch_size": "8"}}


@pytest.fixture()
def tiny_search(tmp_path, results, storage):
    """``tiny_search(name, tables, *enqueued, **options)``: a search of a tiny 8 px space
    (one worker unless ``options`` say otherwise) whose first trials have the ``enqueued``
    params; ``tables`` adds to it (``{"train": {"steps": "30"}}``, values as TOML text).
    Returns ``(SearchResult, study)``.
    """
    from search.run.runner import SearchOptions, run_search
    from search.space import load_space

    def run(name, tables, *enqueued, **options):
        doc = {table: dict(body) for table, body in TINY.items()}
        for table, body in tables.items():
            doc.setdefault(table, {}).update(body)
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(f"[{table}]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())
                                  for table, body in doc.items()))
        study, _, _ = st.open_study(st.open_storage(storage, create=True), name,
                                    load_space(path))
        for params in enqueued:
            study.enqueue_trial(params)
        result = run_search(SearchOptions(space=path, study=name, results=results,
                                          storage=storage, **{"workers": 1, **options}))
        return result, st.load_existing(st.open_storage(storage, create=False), name)

    return run
