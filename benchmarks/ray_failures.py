"""How fast `diffnas search` reports a Ray failure: seconds from the command's start (or
from the SIGKILL of the raylet) to its exit with the one-line error.

    uv run python benchmarks/ray_failures.py [--repeats 3]

Cases: nothing listening at --address; --workers 0; the embedded raylet SIGKILLed while a
trial runs (the watch's delay, from the kill to the exit). Each `diffnas` command runs in
a fresh interpreter, so the first two include its imports; the line printed is the median
and the range over the repeats, with the machine's load average next to it (these
machines are shared: a loaded one stretches every figure).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]


def _diffnas(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _timed_error(*args: str) -> float:
    start = time.monotonic()
    proc = _diffnas(*args)
    proc.communicate(timeout=600)
    assert proc.returncode != 0, args
    return time.monotonic() - start


def _raylet_death(results: Path) -> float:
    storage = f"sqlite:///{results / 'diffnas.db'}"
    proc = _diffnas("search", "--preset", "smoke", "--study", "lost", "--results",
                    str(results), "--workers", "1")
    while not _running(storage):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    (raylet,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.name() == "raylet"]
    raylet.send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert "raylet" in err.strip().splitlines()[-1], err
    return time.monotonic() - start


def _running(storage: str) -> bool:
    try:
        trials = optuna.load_study(study_name="lost", storage=storage).get_trials()
    except Exception:  # noqa: BLE001 (not created yet)
        return False
    return any(t.state == TrialState.RUNNING for t in trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "--address 127.0.0.1:1 (exit with the line)": lambda i: _timed_error(
                "search", "--preset", "smoke", "--results", f"{tmp}/a{i}", "--address",
                "127.0.0.1:1"),
            "--workers 0 (exit with the line)": lambda i: _timed_error(
                "search", "--preset", "smoke", "--results", f"{tmp}/w{i}", "--workers", "0"),
            "raylet SIGKILLed mid-trial (kill to exit)": lambda i: _raylet_death(
                Path(tmp) / f"r{i}"),
        }
        for name, case in cases.items():
            seconds = [case(i) for i in range(args.repeats)]
            print(f"{name}: median {statistics.median(seconds):.1f} s, range "
                  f"{min(seconds):.1f}-{max(seconds):.1f} s over {len(seconds)}, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
