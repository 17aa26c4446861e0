"""A throwaway PostgreSQL server for the storage tests: Debian's binaries, a data folder
under /tmp, loopback only, password (scram) auth, stopped at the end of the session.

The server runs as the ``postgres`` system user (or ``nobody``) when the tests run as root,
since ``initdb`` refuses root; without the binaries the tests that need it skip, saying why.
"""

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

USER = "diffnas"
_databases = itertools.count()


def _bin_dir():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    found = [d for d in dirs if os.access(os.path.join(d, "pg_ctl"), os.X_OK)]
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _server_user():
    """The account the server runs as, and the command prefix that becomes it."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()), []
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return account, ["runuser", "-u", name, "--"]
    return None, None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(prefix, *command):
    return subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True,
                          timeout=120, check=False)


def _start(bin_dir, prefix, folder, password):
    """Start the server; returns its port, or a reason it could not start."""
    (folder / "pw").write_text(password + "\n")
    made = _run(prefix, bin_dir / "initdb", "-D", folder / "data", "-U", USER, "-A",
                "scram-sha-256", "--pwfile", folder / "pw", "-E", "UTF8", "--locale=C",
                "--no-sync")
    if made.returncode != 0:
        return None, f"initdb failed: {(made.stderr or made.stdout).strip()[-300:]}"
    port = _free_port()
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    started = _run(prefix, bin_dir / "pg_ctl", "-D", folder / "data", "-l", folder / "log",
                   "-o", options, "-w", "-t", "60", "start")
    if started.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        return None, f"pg_ctl start failed: {(started.stderr + log).strip()[-300:]}"
    return port, None


@pytest.fixture(scope="session")
def postgres_server():
    """``(host_port_url, password)`` of a running server; ``host_port_url`` lacks the
    database name (``postgresql://diffnas:PASSWORD@127.0.0.1:PORT``)."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    account, prefix = _server_user()
    if account is None:
        pytest.skip("running as root with no postgres or nobody account (and runuser) to "
                    "run the PostgreSQL server as")
    folder = Path(tempfile.mkdtemp(prefix="diffnas-pg-"))  # /tmp: the server user reaches it
    os.chown(folder, account.pw_uid, account.pw_gid)
    password = secrets.token_hex(12)
    port, reason = _start(bin_dir, prefix, folder, password)
    if port is None:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started: {reason}")
    try:
        yield f"postgresql://{USER}:{password}@127.0.0.1:{port}", password
    finally:
        _run(prefix, bin_dir / "pg_ctl", "-D", folder / "data", "-m", "immediate", "-w",
             "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def pg_storage(postgres_server):
    """The storage URL of a fresh, empty database on the session's server (password in it)."""
    base, _ = postgres_server
    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"
