"""Real hosts: Linux network namespaces joined by a bridge, each with its own address.

The cluster steps a person types (README, "A cluster of Macs") run on a head and two workers
with Ray token authentication on; a study runs across them, loses a host mid-trial, takes a
host that joins mid-study, and a host without the cluster's token is refused.

Each host is a namespace with one address (10.77.0.N/24) and its loopback; a further
namespace holds the bridge, so traffic goes to loopback or to these hosts only. Every host
runs this checkout (one filesystem) under a HOME of its own (so its own ~/.ray/auth_token)
and with a device lock of its own, as on separate machines; Ray's temp folder lies in the
test's folder, away from any other Ray on the machine. Needs root and ``ip netns``; skipped
otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from search.storage import record as rec
from workers.device_lock import LOCK_DIR_ENV

REPO = Path(__file__).resolve().parents[3]
SUBNET = "10.77.0"
HEAD, WORKER, DRIVER, EVERY, SKIP = "head", "worker", "driver", "every", "skip"
TRIALS = 8
START_S = 240.0  # one `ray start` on 2 shared cores took 20-30 s
STUDY_S = 540.0
DIED = "worker died"  # the attempt status of a trial whose worker died (search/run/stages.py)

# A killed host refuses the GCS's health checks at once: it is declared dead after 5 of them,
# 1 s apart (Ray's default period is 3 s); a slow live host still has 10 s to answer each.
FAST_DEATH = {"RAY_health_check_period_ms": "1000"}


@dataclass(frozen=True)
class Step:
    """One command of the cluster steps and the host that runs it (HEAD_IP and THIS_IP are
    the head's and the running host's addresses)."""

    role: str
    command: str


# The README's cluster steps as shell lines; the README's own fenced block replaces them once
# it has one (:func:`readme_steps`). Copying the head's token to the other hosts is done here.
STEPS = (
    Step(HEAD, "uv run ray get-auth-token --generate"),
    Step(HEAD, "chmod 600 ~/.ray/auth_token"),
    Step(HEAD, "RAY_AUTH_MODE=token uv run ray start --head --node-ip-address=HEAD_IP "
               "--port=6379 --resources='{\"diffnas_device\": 1}'"),
    Step(WORKER, "RAY_AUTH_MODE=token uv run ray start --address=HEAD_IP:6379 "
                 "--node-ip-address=THIS_IP --resources='{\"diffnas_device\": 1}'"),
    Step(DRIVER, "RAY_AUTH_MODE=token uv run diffnas search --preset smoke --address HEAD_IP:6379"),
)
LIST = "RAY_AUTH_MODE=token uv run diffnas workers --address"


def classify(line: str) -> str:
    """The role of one README cluster line.

    Raises:
        ValueError: a line that is none of the known steps, quoted.
    """
    if "ray stop" in line:
        return SKIP  # ends every Ray process of the machine, not one host's; teardown kills
    if "ray start" in line:
        return HEAD if "--head" in line else WORKER
    if "diffnas search" in line:
        return DRIVER
    if "auth_token" in line and re.search(r"\b(scp|rsync|cp)\b", line):
        return SKIP  # copying the token between machines: the harness copies it
    if "get-auth-token" in line or line.startswith("chmod"):
        return HEAD
    if line.startswith("export "):
        return EVERY
    raise ValueError(f"README cluster step not understood: {line!r}")


def readme_steps(text: str) -> tuple[Step, ...] | None:
    """The fenced block after the README's first heading that mentions a cluster, as steps;
    None when that section has no fenced block."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = re.match(r"(#+)\s.*cluster", line, re.IGNORECASE)
        if heading:
            block = _fenced(lines[i + 1:], len(heading.group(1)))
            if block is None:
                return None
            return tuple(Step(classify(c), c) for c in block)
    return None


def _fenced(lines: list[str], level: int) -> list[str] | None:
    """The commands of the first fenced block before a heading of ``level`` or above."""
    start = next((i for i, line in enumerate(lines) if line.startswith("```")
                  or re.match(rf"#{{1,{level}}}\s", line)), None)
    if start is None or not lines[start].startswith("```"):
        return None
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(lines[start + 1:end]))
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def cluster_steps() -> tuple[Step, ...]:
    """The README's cluster block when it has one, else :data:`STEPS`."""
    return readme_steps((REPO / "README.md").read_text()) or STEPS


@dataclass(frozen=True)
class Ran:
    rc: int
    output: str

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


@dataclass(frozen=True)
class Host:
    """One namespace with one address; commands run in it under its own HOME and TMPDIR."""

    name: str
    ip: str
    folder: Path
    env: dict[str, str]

    def start(self, command: str, log: str) -> subprocess.Popen[bytes]:
        """``command`` (bash, HEAD_IP and THIS_IP already filled in) in this namespace."""
        with open(self.folder / f"{log}.log", "wb") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.name, "bash", "-c", command],
                                    cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def run(self, command: str, log: str, timeout: float = START_S) -> Ran:
        proc = self.start(command, log)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return Ran(proc.returncode, (self.folder / f"{log}.log").read_text(errors="replace"))

    def pids(self) -> list[int]:
        """The processes in this namespace (what ``ip netns pids`` lists)."""
        want = os.stat(f"/run/netns/{self.name}")
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ns = os.stat(f"/proc/{pid}/ns/net")
            except OSError:  # gone, or a kernel thread
                continue
            if (ns.st_ino, ns.st_dev) == (want.st_ino, want.st_dev):
                found.append(int(pid))
        return found

    def running_trial(self) -> bool:
        """A trial process runs here: spawned (``python -m workers.trial``), or forked by
        its worker's warm process (``workers.forkserver``, whose children share its command
        line)."""
        pids = set(self.pids())
        for pid in pids:
            try:
                line = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"workers.trial" in line:
                    return True
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if b"workers.forkserver" in line and parent in pids and (
                        b"workers.forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()):
                    return True
            except (OSError, ValueError, IndexError):
                continue
        return False

    def kill(self) -> None:
        """SIGKILL every process of this host, until none is left."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


class Network:
    """A bridge in a namespace of its own and the hosts plugged into it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.prefix = f"dn{os.getpid()}"
        self.switch = f"{self.prefix}sw"
        self.hosts: dict[int, Host] = {}
        self.base_env = _base_env()
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, n: int) -> Host:
        """Host ``n`` at 10.77.0.n, its loopback up, plugged into the bridge."""
        if n in self.hosts:
            return self.hosts[n]
        name = f"{self.prefix}h{n}"
        _ip("netns", "add", name)
        self.hosts[n] = host = self._host(name, n)
        _ip("-n", self.switch, "link", "add", f"v{n}", "type", "veth", "peer", "name", "eth0",
            "netns", name)
        _ip("-n", self.switch, "link", "set", f"v{n}", "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return host

    def _host(self, name: str, n: int) -> Host:
        folder = self.folder / f"h{n}"
        for sub in ("home", "ray", "lock"):
            (folder / sub).mkdir(parents=True)
        # The temp folder stays the machine's: MLX's compiled kernels and the reference
        # calibration are the CPU's, and a cold cache per host cost minutes of compiling.
        env = {**self.base_env, "HOME": str(folder / "home"), "RAY_TMPDIR": str(folder / "ray"),
               LOCK_DIR_ENV: str(folder / "lock")}
        return Host(name, f"{SUBNET}.{n}", folder, env)

    def close(self) -> None:
        """Kill every host's processes, then remove the namespaces (their veths go with them)."""
        for host in self.hosts.values():
            host.kill()
        for name in [h.name for h in self.hosts.values()] + [self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _base_env() -> dict[str, str]:
    """What every host's shell gets: this venv's PATH, uv without network or sync, no usage
    stats, Ray workers started without ``uv run``, fast death detection."""
    cache = subprocess.run(["uv", "cache", "dir"], capture_output=True, text=True,
                           check=True).stdout.strip()
    return {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "UV_CACHE_DIR": cache,
            "UV_NO_SYNC": "1", "UV_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **FAST_DEATH}


@pytest.fixture(scope="module")
def network(request):
    """A :class:`Network`, removed with everything in it after the module (even on failure)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("uv") is None:
        pytest.skip("needs `ip` (iproute2) and `uv` on PATH")
    folder = Path(tempfile.mkdtemp(prefix="dn", dir="/tmp"))  # short: Ray's socket paths
    try:
        net = Network(folder)
    except RuntimeError as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot create a network namespace: {err}")
    request.addfinalizer(net.close)
    return net


@dataclass(frozen=True)
class Cluster:
    """The hosts the cluster steps started, and the steps (to run more of them)."""

    network: Network
    head: Host
    workers: tuple[Host, ...]
    steps: tuple[Step, ...]
    address: str

    def fill(self, command: str, host: Host) -> str:
        """``command`` for ``host``: the cluster's export lines first, addresses filled in."""
        exports = [s.command for s in self.steps if s.role == EVERY]
        line = " && ".join([*exports, command])
        return line.replace("HEAD_IP", self.head.ip).replace("THIS_IP", host.ip)

    def step(self, role: str) -> str:
        return next(s.command for s in self.steps if s.role == role)

    def join(self, host: Host, log: str) -> Ran:
        """Run the worker steps on ``host`` (its token copied from the head first)."""
        token = self.head.folder / "home" / ".ray" / "auth_token"
        (host.folder / "home" / ".ray").mkdir(exist_ok=True)
        shutil.copy2(token, host.folder / "home" / ".ray" / "auth_token")
        return self.run_role(host, WORKER, log)

    def run_role(self, host: Host, role: str, log: str) -> Ran:
        """Every step of ``role`` on ``host``; the first that fails ends it."""
        ran = Ran(0, "")
        for i, step in enumerate(s for s in self.steps if s.role == role):
            ran = host.run(self.fill(step.command, host), f"{log}-{i}")
            if ran.rc:
                return ran
        return ran

    def nodes(self) -> dict[str, str]:
        """``{node id prefix: address}`` of the live nodes, as ``diffnas workers`` lists them."""
        listed = self.head.run(self.fill(f"{LIST} {self.address}", self.head), "list")
        assert listed.rc == 0, listed.output[-2000:]
        return dict(re.findall(r"node (\w+) ([\d.]+): \d+", listed.output))


@pytest.fixture(scope="module")
def cluster(network):
    """A head (10.77.0.1) and two workers (.2, .3) started by the cluster steps."""
    steps = cluster_steps()
    port = re.search(r"--port[= ](\d+)", " ".join(s.command for s in steps if s.role == HEAD))
    head = network.add(1)
    built = Cluster(network, head, (network.add(2), network.add(3)), steps,
                    f"{head.ip}:{port.group(1) if port else 6379}")
    started = built.run_role(head, HEAD, "head")
    assert started.rc == 0, started.output[-3000:]
    for worker in built.workers:  # one at a time: a raylet has 30 s to register, on 2 cores
        joined = built.join(worker, "join")
        assert joined.rc == 0, joined.output[-3000:]
    return built


REACH = """
import errno, json, socket, sys
out = {}
for target in sys.argv[1:]:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((target, 9))
        out[target] = "open"
    except ConnectionRefusedError:
        out[target] = "answered"
    except OSError as err:
        out[target] = errno.errorcode.get(err.errno, str(err))
print(json.dumps(out))
"""


def _reach(host: Host, *targets: str) -> dict[str, str]:
    """From ``host``: "answered" when a target's kernel refused port 9 (it is reachable)."""
    command = [sys.executable, "-c", REACH, *targets]
    done = subprocess.run(["ip", "netns", "exec", host.name, *command], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_hosts_reach_each_other_and_loopback_and_nothing_else(network):
    a, b = network.hosts.get(2) or network.add(2), network.hosts.get(3) or network.add(3)
    got = _reach(a, b.ip, a.ip, "127.0.0.1", "8.8.8.8")
    assert got == {b.ip: "answered", a.ip: "answered", "127.0.0.1": "answered",
                   "8.8.8.8": "ENETUNREACH"}
    routes = subprocess.run(["ip", "-n", a.name, "route"], capture_output=True, text=True,
                            check=True)
    assert routes.stdout.split()[0] == f"{SUBNET}.0/24" and len(routes.stdout.splitlines()) == 1


def test_readme_steps_come_from_the_cluster_sections_fenced_block():
    text = ("# diffnas\n### A cluster of Macs\nSome words.\n```\nexport A=1\n"
            "uv run ray get-auth-token --generate\nscp ~/.ray/auth_token THIS_IP:.ray/\n"
            "ray start --head --port=6379 \\\n  --node-ip-address=HEAD_IP\n"
            "ray start --address=HEAD_IP:6379\n# then\nuv run diffnas search --address X\n```\n")
    assert [s.role for s in readme_steps(text)] == [EVERY, HEAD, SKIP, HEAD, WORKER, DRIVER]
    assert readme_steps(text)[3].command == "ray start --head --port=6379 --node-ip-address=HEAD_IP"
    assert readme_steps("### A cluster of Macs\n1. `ray start`\n## Next\n```\nls\n```\n") is None
    with pytest.raises(ValueError, match="uv sync"):
        readme_steps("## Cluster\n```\nuv sync\n```\n")


@pytest.mark.slow
def test_ray_refuses_a_node_with_another_token(cluster):
    stranger = cluster.network.add(5)
    own = stranger.run(cluster.fill("uv run ray get-auth-token --generate", stranger), "own")
    assert own.rc == 0, own.output[-2000:]
    joined = cluster.run_role(stranger, WORKER, "stranger")
    assert joined.rc != 0 and "token" in joined.output.lower(), joined.output[-2000:]
    listed = cluster.nodes()
    assert cluster.head.ip in listed.values() and stranger.ip not in listed.values(), listed


@pytest.mark.slow
def test_diffnas_without_the_token_says_so_in_one_line(cluster):
    stranger = cluster.network.add(6)
    command = f"{cluster.step(DRIVER)} --preset smoke --results {stranger.folder / 'r'} --trials 1"
    ran = stranger.run(cluster.fill(command, stranger), "search", timeout=120)
    said = [line for line in ran.lines if "token" in line.lower() and cluster.address in line]
    assert ran.rc != 0 and said and "Traceback" not in ran.output, ran.output[-3000:]


def _wait(what: str, ready: Callable[[], object], driver: subprocess.Popen[bytes],
          timeout: float = STUDY_S) -> object:
    """Poll ``ready`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        assert driver.poll() is None, f"the study ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)
    return got


def _records(storage: str, name: str) -> list[rec.TrialRecord]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # noqa: BLE001 (not created yet, or the file is mid-creation)
        return []
    return [rec.read(t) for t in study.get_trials()]


def _on(record: rec.TrialRecord, nodes: dict[str, str]) -> str:
    """The address of the node that finished ``record`` ("?" if not listed)."""
    node = record.finished.node or {}
    return next((ip for prefix, ip in nodes.items() if node.get("id", "").startswith(prefix)), "?")


def _victim(workers: tuple[Host, ...], records: list[rec.TrialRecord],
            nodes: dict[str, str]) -> Host | None:
    """A worker host that has finished a trial and runs another now."""
    done = {_on(r, nodes) for r in records}
    return next((h for h in workers if h.ip in done and h.running_trial()), None)


@pytest.mark.slow
def test_a_study_spans_the_hosts_outlives_one_and_takes_a_newcomer(cluster):
    nodes, newcomer = cluster.nodes(), cluster.network.add(4)
    results = cluster.head.folder / "results"
    storage, name = f"sqlite:///{results / 'diffnas.db'}", "hosts"
    command = (f"{cluster.step(DRIVER)} --preset smoke --results {results} --study {name} "
               f"--trials {TRIALS}")
    driver = cluster.head.start(cluster.fill(command, cluster.head), "driver")
    try:
        _wait("trial running", lambda: any(h.running_trial() for h in cluster.workers), driver)
        joined = cluster.join(newcomer, "newcomer")
        assert joined.rc == 0, joined.output[-3000:]
        since = time.monotonic()
        _wait("trial on the newcomer", newcomer.running_trial, driver)
        print(f"the newcomer ran a trial {time.monotonic() - since:.1f} s after it joined")
        victim = _wait("worker host with a finished trial running another",
                       lambda: _victim(cluster.workers, _records(storage, name), nodes), driver)
        victim.kill()
        driver.wait(STUDY_S)
    finally:
        print((cluster.head.folder / "driver.log").read_text(errors="replace")[-3000:])
    assert driver.returncode == 0
    nodes.update(cluster.nodes())
    records = _records(storage, name)
    complete = [r for r in records if r.complete]
    assert len(complete) == TRIALS
    hosts = {cluster.head.ip, *(w.ip for w in cluster.workers), newcomer.ip}
    assert {_on(r, nodes) for r in complete} == hosts
    moved = [r for r in records if any(a.status == DIED for a in r.attempts)]
    assert moved and all(r.complete and _on(r, nodes) != victim.ip for r in moved), moved
    print(*(f"trial {r.number} moved from {victim.ip} to {_on(r, nodes)}" for r in moved))
