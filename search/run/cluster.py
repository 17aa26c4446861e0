"""Where the coordinator's Ray runs, and who may reach it.

Three guards sit around :func:`search.run.pool.connect`:

* An embedded cluster listens on loopback only (:func:`loopback_only`).
* A cluster we join is checked before ``ray.init`` (:func:`check_cluster`): its GCS port
  must answer within seconds, it must require token authentication (unless the user
  passes ``--insecure``), and our token must be the one it accepts. Ray's own join would
  retry for minutes, or abort the process, instead.
* While a search runs, a :class:`Watch` notices a dead GCS or raylet before Ray's core
  worker does (which exits the process with a log dump) and stops with one line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._private.services import get_ray_address_from_environment
from ray._raylet import Config  # type: ignore[attr-defined]

# Ray on Linux takes the node's network address even for `ray.init()`, and its gRPC
# servers then listen on every interface; with clusters disabled (the macOS default) the
# node address is 127.0.0.1 and every server binds loopback. The variable is read when
# ray is imported, hence the constant too. (`_node_ip_address="127.0.0.1"` does not help:
# ray.init swaps a loopback address for the network one.)
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
REACH_S = 3.0  # a GCS port that takes longer than this to accept is unreachable
PROBE_S = 30.0  # bound on one probe process (its own GCS timeouts total about 8 s)
WATCH_S = 1.0  # how often the watch checks the GCS and the raylet
EXIT_LOST = 3  # exit status when the cluster dies under a running search

# A fresh process asks the GCS for its cluster id, which every authenticated call needs.
# Exit 0: accepted; 3: the token is missing or wrong; 4: anything else (printed).
_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    sys.exit(3)
except Exception as err:
    print((str(err).splitlines() or [type(err).__name__])[0])
    sys.exit(4)
"""
_PROBE_ENV = {"RAY_gcs_rpc_server_connect_timeout_s": "3", "RAY_py_gcs_connect_timeout_s": "4"}


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Start Ray inside this block to have every one of its servers listen on 127.0.0.1."""
    saved_env, saved = os.environ.get(CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which imported ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = saved_env


def check_cluster(address: str, insecure: bool = False) -> str:
    """Check that the cluster at ``address`` can be joined safely; returns its GCS address.

    Afterwards a token cluster is joined with token authentication turned on here.

    Raises:
        ValueError: a malformed address, nothing answering there, a cluster without token
            authentication (unless ``insecure``), our token missing or wrong.
    """
    gcs = _resolve(address)
    _reach(address, gcs)
    try:
        token, where = find_token()
    except ValueError as err:
        raise ValueError(f"cannot join the Ray cluster at {address}: {err}") from None
    bare = _probe(gcs, None)  # both at once: each takes a few seconds to start
    signed = _probe(gcs, token) if token is not None else None
    try:
        if _needs_token(address, insecure, bare.result()):
            _accepts(address, where, signed.result() if signed else None)
            _enable_token_auth()
    finally:
        for probe in (bare, signed):
            if probe is not None:
                probe.stop()
    return gcs


def _reach(address: str, gcs: str) -> None:
    try:
        socket.create_connection(_split(gcs), timeout=REACH_S).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason} (is `ray "
                         "start --head` running there, and is its port open to us?)") from None


def _needs_token(address: str, insecure: bool, bare: tuple[int, str]) -> bool:
    """Whether the cluster refused the probe without a token."""
    code, detail = bare
    if code == 0 and not insecure:
        raise ValueError(f"the Ray cluster at {address} does not require token "
                         "authentication, so anyone who reaches it can run code there: "
                         "start it with RAY_AUTH_MODE=token (README, 'A cluster of "
                         "machines'), or pass --insecure to join it anyway")
    if code not in (0, 3):
        raise ValueError(f"cannot join the Ray cluster at {address}: {detail}")
    return code == 3


def _accepts(address: str, where: str, signed: tuple[int, str] | None) -> None:
    """Raise unless the cluster accepted the probe with our token (``None``: we have none)."""
    if signed is None:
        raise ValueError(f"the Ray cluster at {address} requires a token and diffnas found "
                         f"none (looked in {where})")
    code, detail = signed
    if code == 3:
        raise ValueError(f"the Ray cluster at {address} rejected our token (from {where}): "
                         "it is not that cluster's token")
    if code != 0:
        raise ValueError(f"cannot join the Ray cluster at {address}: {detail}")


def find_token() -> tuple[str | None, str]:
    """The token Ray would send, by Ray's precedence, and where it came from (or where we
    looked, when there is none).

    Raises:
        ValueError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty.
    """
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        token = _first_line(Path(path))
        if not token:
            raise ValueError(f"{TOKEN_PATH_ENV}={path}: cannot read a token from it")
        return token, f"{TOKEN_PATH_ENV}={path}"
    default = Path.home() / ".ray" / "auth_token"
    token = _first_line(default)
    if token:
        return token, str(default)
    return None, f"{TOKEN_ENV}, {TOKEN_PATH_ENV} and {default}"


class Watch:
    """Checks the cluster's GCS and this node's raylet every second from a thread, and
    calls ``on_lost(what died)`` once when they fail two checks in a row (Ray's own
    reaction, seconds later, is to end the process with a log dump)."""

    def __init__(self, gcs: str, raylet: str, remote: bool,
                 on_lost: Callable[[str], None]) -> None:
        self.gcs, self.raylet, self.remote, self.on_lost = gcs, raylet, remote, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffnas-ray-watch",
                                        daemon=True)

    @classmethod
    def start(cls, on_lost: Callable[[str], None], remote: bool) -> Watch:
        """Watch the cluster this process is connected to."""
        node_id = ray.get_runtime_context().get_node_id()
        (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
        raylet = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
        watch = cls(ray.get_runtime_context().gcs_address, raylet, remote, on_lost)
        watch._thread.start()
        return watch

    def stop(self) -> None:
        self._stop.set()

    def lost(self) -> str | None:
        """What is gone now, or ``None``. The raylet is checked first: an embedded cluster
        whose raylet dies has Ray stop its GCS too."""
        if _refusal(self.raylet) is not None:
            return f"this node's raylet at {self.raylet} died"
        gcs = _refusal(self.gcs)
        if gcs is None:
            return None
        if self.remote and gcs != "refused":
            return f"lost the connection to the Ray cluster at {self.gcs} ({gcs})"
        return f"the Ray cluster's GCS at {self.gcs} died"

    def _loop(self) -> None:
        first: str | None = None  # the first death seen is the cause
        while not self._stop.wait(WATCH_S):
            what = self.lost()
            if what is None:
                first = None
            elif first is None:
                first = what
            else:
                self.on_lost(first)
                return


@contextlib.contextmanager
def native_output_to(path: Path) -> Iterator[None]:
    """Send Ray's own output of this process into ``path``: what its C++ code writes to file
    descriptors 1 and 2, its Python loggers, and the log dump of a dead raylet that its
    error thread prints to ``sys.stdout`` (a search prints nothing there). Python's
    ``sys.stderr`` (progress, errors) keeps writing to the terminal. Restored on exit, when
    an empty ``path`` is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    stderr = sys.stderr
    if _on_fd(stderr, 2):  # else it writes elsewhere already (a test's capture)
        sys.stderr = open(os.dup(2), "w", buffering=1)  # noqa: SIM115
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stdout.flush()
        if sys.stderr is not stderr:
            sys.stderr.close()
            sys.stderr = stderr
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)
        if path.stat().st_size == 0:
            path.unlink()


def _on_fd(stream: object, fd: int) -> bool:
    try:
        return bool(stream.fileno() == fd)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _resolve(address: str) -> str:
    if address == "auto":  # the cluster `ray start` recorded on this machine, or RAY_ADDRESS
        found = get_ray_address_from_environment("auto", None)
        if not found or found == "local":
            raise ValueError("no Ray cluster runs on this machine: give --address HOST:PORT")
        return str(found)
    _split(address)
    return address


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address!r}: expected HOST:PORT of the Ray head's GCS "
                         "(port 6379 unless `ray start --head --port` said otherwise)")
    return host.strip("[]"), int(port)


class _Probe:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def result(self) -> tuple[int, str]:
        """(exit status, first line it printed); a probe that hangs counts as status 4."""
        try:
            out, _ = self.proc.communicate(timeout=PROBE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return 4, f"its GCS did not answer within {PROBE_S:.0f} s"
        return self.proc.returncode, (out.strip().splitlines() or ["no answer"])[0]

    def stop(self) -> None:
        """End the probe if it still runs (its answer is no longer needed)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def _probe(gcs: str, token: str | None) -> _Probe:
    """Ask the GCS for its cluster id from a fresh process, with ``token`` or none (Ray
    caches the token and the auth mode per process, so a probe cannot run in this one)."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_PATH_ENV)}
    env.update(_PROBE_ENV)
    env[AUTH_MODE_ENV] = "token" if token is not None else "disabled"
    if token is not None:
        env[TOKEN_ENV] = token
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, gcs], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return _Probe(proc)


def _enable_token_auth() -> None:
    """Join with token authentication, as Ray does itself for a cluster found locally."""
    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # Ray read the mode from the environment once: read it again


def _first_line(path: Path) -> str:
    try:
        with path.open() as f:
            return f.readline().strip()
    except OSError:
        return ""


def _refusal(address: str) -> str | None:
    """``None`` when ``address`` accepts a TCP connection, else why not ("refused", …)."""
    host, port = _split(address)
    try:
        socket.create_connection((host, port), timeout=REACH_S).close()
        return None
    except ConnectionRefusedError:
        return "refused"
    except OSError as err:
        return "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
