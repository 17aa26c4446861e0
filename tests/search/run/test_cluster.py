"""Ray's security and failures as diffnas meets them: a loopback-only embedded cluster,
token authentication when joining one, unreachable addresses, and a GCS or raylet that
dies under a running search. Every cluster here is real, in its own processes."""

import ipaddress
import os
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.run.cluster import CLUSTER_ENV, EXIT_LOST
from search.run.runner import SearchOptions, run_search

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKEN = "9f1c2a7e5d3b4c6a8e0f1d2c3b4a5968"  # the token head's secret (any string works)
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

# A coordinator's Ray, started the way diffnas starts it, watched the way a search is.
EMBEDDED = """
import sys, tempfile
from pathlib import Path
import ray
import workers
from search.run.cluster import Watch, native_output_to
from search.run.pool import connect
from search.run.runner import Abandon
with native_output_to(Path(tempfile.mkdtemp()) / "ray.log"):
    connect(None, 1)
    ray.get(ray.remote(lambda: 1).remote())  # a worker process runs, with its servers
    Watch.start(Abandon(), remote=False)
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.read()
"""

# A head node that stays up until its stdin closes; prints its GCS address.
HEAD = """
import logging, sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(changes)
    return env


def _python(code, env=None, **kw):
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env or _env(),
                            stdin=subprocess.PIPE, text=True, **kw)


def _diffnas(*args, env=None):
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=120,
                          check=False)


def _one_line(proc, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


def _tree(pid):
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _named(pid, name):
    (found,) = [p for p in _tree(pid) if p.name() == name]
    return found


def _loopback(ip):
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.fixture()
def embedded():
    proc = _python(EMBEDDED, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = proc.stderr.readline()
    assert line.strip() == "ready", line + proc.stderr.read()
    yield proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_the_embedded_cluster_listens_on_loopback_only(embedded):
    pids = {p.pid: p.name() for p in _tree(embedded.pid)}
    listening = [(pids[c.pid], c.laddr.ip, c.laddr.port)
                 for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the check covers the core servers
    assert len(listening) >= 4, listening  # and the driver's and the worker's too
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    assert not exposed, exposed


@pytest.mark.parametrize("process", [
    "raylet", pytest.param("gcs_server", marks=pytest.mark.slow)])
def test_a_dead_raylet_or_gcs_is_one_line(embedded, process):
    _named(embedded.pid, process).send_signal(signal.SIGKILL)
    # Not communicate(): it closes stdin, which ends the script (exit 0) before the watch
    # has seen the death.
    embedded.wait(timeout=60)
    err = embedded.stderr.read()
    lines = err.strip().splitlines()
    assert embedded.returncode == EXIT_LOST, err
    what = "this node's raylet" if process == "raylet" else "the Ray cluster's GCS"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"diffnas: error: {what} at 127.0.0.1:"), err
    assert lines[0].endswith("died; run the same command again to resume the study"), err


@pytest.fixture(scope="module")
def heads():
    """Two loopback heads: one that requires ``TOKEN``, one without authentication. They
    start one after the other: Ray gives a starting node 30 s, and these machines are
    shared."""
    procs, addresses = [], {}
    for name, mode in (("token", "token"), ("open", "disabled")):
        env = _env(RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN=TOKEN, **{CLUSTER_ENV: "0"})
        procs.append(_python(HEAD, env, stdout=subprocess.PIPE))
        addresses[name] = procs[-1].stdout.readline().strip()
        assert addresses[name], f"the {name} head did not start"
    yield addresses
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


def _client(tmp_path, **changes):
    """A client on this machine whose home holds no token (Ray reads ~/.ray/auth_token)."""
    return _env(HOME=str(tmp_path), **{CLUSTER_ENV: "0"}, **changes)


def test_a_missing_token_is_one_line(heads, tmp_path):
    line = _one_line(_diffnas("workers", "--address", heads["token"], env=_client(tmp_path)))
    assert f"the Ray cluster at {heads['token']} requires a token and diffnas found none" in line
    assert str(tmp_path / ".ray" / "auth_token") in line  # where it looked


def test_a_wrong_token_is_one_line(heads, tmp_path):
    proc = _diffnas("workers", "--address", heads["token"],
                    env=_client(tmp_path, RAY_AUTH_TOKEN="not-the-token"))
    assert f"the Ray cluster at {heads['token']} rejected our token" in _one_line(proc)


def test_the_right_token_from_a_file_joins(heads, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    proc = _diffnas("workers", "--address", heads["token"],
                    env=_client(tmp_path, RAY_AUTH_TOKEN_PATH=str(token)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 node(s), 0 device unit(s)"), proc.stdout


def test_a_cluster_without_tokens_needs_insecure(heads, tmp_path):
    results = tmp_path / "results"
    line = _one_line(_diffnas("search", "--preset", "smoke", "--results", results,
                              "--address", heads["open"], env=_client(tmp_path)))
    assert f"the Ray cluster at {heads['open']} does not require token authentication" in line
    assert "--insecure" in line
    assert not (results / "diffnas.db").exists()
    proc = _diffnas("workers", "--address", heads["open"], "--insecure",
                    env=_client(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith("1 node(s)"), proc.stderr


def test_nothing_listening_fails_before_the_study_exists(tmp_path, in_process):
    results = tmp_path / "results"
    line = _one_line(in_process("search", "--preset", "smoke", "--study", "x", "--results",
                                results, "--address", "127.0.0.1:1"))  # no cluster is reached
    assert line == ("diffnas: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection "
                    "refused (is `ray start --head` running there, and is its port open to "
                    "us?)")
    assert not (results / "diffnas.db").exists()


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_fewer_than_one_worker_is_refused_at_once(tmp_path, workers, capsys):
    results = tmp_path / "results"
    # in this process (tests/search/cli/test_bad_input.py runs the real one on a bad count)
    code = main(["search", "--preset", "smoke", "--results", str(results), "--workers", workers])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --workers: must be >= 1" in lines[0], lines
    assert not results.exists()
    with pytest.raises(ValueError, match=f"--workers: must be >= 1, got {workers}"):
        run_search(SearchOptions(space="smoke", results=results, workers=int(workers)))
    assert not results.exists()


def _trials(storage):
    try:
        return optuna.load_study(study_name="lost", storage=storage).get_trials()
    except Exception:  # noqa: BLE001 (not created yet, or the file is mid-creation)
        return []


@pytest.mark.slow
def test_a_search_whose_raylet_dies_stops_with_one_line_and_resumes(tmp_path):
    results = tmp_path / "results"
    storage = f"sqlite:///{results / 'diffnas.db'}"
    command = ["search", "--preset", "smoke", "--study", "lost", "--results", results,
               "--workers", "1"]
    first = subprocess.Popen([sys.executable, "-m", "search.cli", *map(str, command)],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(t.state == TrialState.RUNNING for t in _trials(storage)):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.5)
    _named(first.pid, "raylet").send_signal(signal.SIGKILL)
    out, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_LOST, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffnas: error: this node's raylet at 127.0.0.1:"), err
    assert last.endswith("died; run the same command again to resume the study"), err
    for text in (out, err):  # no traceback, no Ray log dump
        assert "Traceback" not in text and "state-dump" not in text and "raylet.out" not in text
        assert not any(line.startswith("[20") for line in text.splitlines()), text
    second = _diffnas(*command)
    assert second.returncode == 0, second.stderr
    assert "(resumed)" in second.stdout
    assert sum(t.state == TrialState.COMPLETE for t in _trials(storage)) == 4
