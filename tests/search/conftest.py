"""Fixtures of the search tests."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search import study as st


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
                                         user_attrs={st.MEASUREMENT: m, st.RUNGS: rungs}))
        return study.get_trials()

    return make
