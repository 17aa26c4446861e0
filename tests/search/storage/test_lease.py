"""The coordinator lease, on real SQLite storage and real processes."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict

import pytest

from search.space import load_space
from search.storage import lease
from search.storage import study as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Each racer opens the study, says it is ready, waits for "go" and tries to take the lease;
# the winner stays alive (holding it) until every racer has tried.
RACER = textwrap.dedent("""
    import pathlib, sys, time
    from search.storage import lease, study as st
    url, gate, settle = sys.argv[1], pathlib.Path(sys.argv[2]), float(sys.argv[3])
    study = st.load_existing(st.open_storage(url, create=False), "s")
    study.user_attrs  # the connection is open before the race
    (gate / f"ready-{sys.argv[4]}").touch()
    while not (gate / "go").exists():
        time.sleep(0.0005)
    try:
        held = lease.acquire(study, settle_s=settle)
    except lease.LeaseHeldError as err:
        print("refused", err)
    else:
        print("won", held.holder.pid)
        time.sleep(4)
""")
RACERS = 3


def race(storage, gate, settle_s):
    """The stdout lines of :data:`RACERS` processes that try to take the lease at once, and
    their pids."""
    racers = [subprocess.Popen([sys.executable, "-c", RACER, storage, str(gate), str(settle_s),
                                str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(RACERS)]
    while len(list(gate.glob("ready-*"))) < RACERS:
        assert all(p.poll() is None for p in racers), [p.stderr.read() for p in racers]
        time.sleep(0.05)
    (gate / "go").touch()
    outs = [p.communicate(timeout=120) for p in racers]
    assert all(p.returncode == 0 for p in racers), [err for _, err in outs]
    return [out.strip() for out, _ in outs], [p.pid for p in racers]


@pytest.fixture()
def study(storage):
    return st.open_study(st.open_storage(storage, create=True), "s", load_space("smoke"))[0]


def _holder(**fields):
    now = time.time()
    doc = {"token": "t0", "host": socket.gethostname(), "pid": os.getpid(), "started": now,
           "heartbeat": now, **fields}
    return lease.Holder(**doc)


def test_processes_started_together_elect_exactly_one_holder(storage, study, tmp_path):
    lines, pids = race(storage, tmp_path, lease.SETTLE_S)
    winners = [line for line in lines if line.startswith("won")]
    assert len(winners) == 1, lines
    refused = [line for line in lines if line.startswith("refused")]
    assert len(refused) == RACERS - 1, lines
    # A racer refuses on the first live token it reads: the winner's, or that of another
    # racer still settling (which then loses); either way a racing coordinator is named.
    assert all(any(f"pid {pid} " in line for pid in pids) for line in refused), lines


def test_a_live_lease_is_refused_naming_its_holder(study):
    study.set_user_attr(lease.LEASE, asdict(_holder(host="mac-7", pid=4242)))
    with pytest.raises(lease.LeaseHeldError, match="on host mac-7 pid 4242 "):
        lease.acquire(study, settle_s=0.0)
    assert lease.describe(study).startswith("coordinator alive on host mac-7 pid 4242")


@pytest.mark.parametrize("dead", [
    {"host": "mac-7", "heartbeat": time.time() - 2 * lease.TIMEOUT_S},  # stale heartbeat
    {"pid": 2**22 + 17},  # this host, no such process: taken over at once
])
def test_a_dead_holder_is_taken_over_as_a_resume(study, dead):
    study.set_user_attr(lease.LEASE, asdict(_holder(**dead)))
    assert "not running" in lease.describe(study)
    held = lease.acquire(study, settle_s=0.0)
    assert held.took_over is not None and held.took_over.token == "t0"
    assert lease.read(study).pid == os.getpid()


def test_renew_stops_a_coordinator_whose_lease_was_taken(study):
    held = lease.acquire(study, settle_s=0.0)
    before = lease.read(study).heartbeat
    time.sleep(0.01)
    held.renew(force=True)
    assert lease.read(study).heartbeat > before
    study.set_user_attr(lease.LEASE, asdict(_holder(token="other", host="mac-7", pid=99)))
    with pytest.raises(lease.LeaseLostError, match="host mac-7 pid 99"):
        held.renew(force=True)
    held.release()  # not ours any more: left as it is
    assert lease.read(study).token == "other"


def test_release_frees_the_study_for_the_next_coordinator(study):
    assert lease.describe(study) == "no coordinator has run"
    lease.acquire(study, settle_s=0.0).release()
    assert "exited cleanly" in lease.describe(study)
    assert lease.acquire(study, settle_s=0.0).took_over is None
