#!/usr/bin/env python3
"""Fault injection: SIGKILL a part of a running search at a random moment, resume, and
check that the study is still whole; then feed the CLI bad input and check each answer.

  uv run python benchmarks/faults.py [--kills 24] [--seed 0] [--work results/faults]
      [--json benchmarks/faults.json] [--skip-bad-input] [--bad-input-only]

**Kills.** Each round runs a ``smoke`` study (embedded Ray, ``--workers 2``) in its own
process and kills one of its parts with SIGKILL after a random delay: the coordinator
(the ``diffnas search`` process), a worker actor (``ray::DeviceWorker``), a trial process
(forked by the worker's warm process, or ``python -m workers.trial``) or the embedded cluster's raylet. It then runs the same
command again until it exits 0 (the resume) and checks the invariants against the
storage:

1. no COMPLETE trial seen right after the kill is lost or changed (params, values);
2. no parameter set completed twice;
3. no trial left RUNNING after the resume;
4. the target count of finished trials reached.

A study takes ``--kills-per-study`` rounds; each raises its target by 4 trials, so that
later kills land in a study that already holds finished trials and has work left.

**Bad input.** Every entry of :data:`BAD_INPUTS` is run as ``diffnas ARGS...``; the table
records its exit code, whether stderr was one line (no traceback), and whether the storage
it points at was left as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
DIFFNAS = [sys.executable, "-m", "search.cli"]
TARGETS = ("coordinator", "actor", "trial", "raylet")
TARGET_TRIALS = 4  # per run; the n-th kill of a study asks for n * 4 finished trials
DELAY_S = (2.0, 15.0)  # when to kill: a smoke run of 4 trials takes about 20 s on 2 cores
RUN_LIMIT_S = 600.0  # one search run; a smoke study takes about a minute on 2 cores


@dataclass(frozen=True)
class Kill:
    """One injected fault and what the invariants said after the resume."""

    round: int
    study: str
    target: str
    delay_s: float
    killed_pid: int | None  # None: the target did not exist at that moment (not counted)
    run_exit: int | None  # the killed run's exit code
    run_last_line: str  # its stderr's last line
    resumes: int
    complete_before: int
    lost_or_changed: int
    duplicate_params: int
    running_after: int
    finished_after: int
    target_trials: int

    @property
    def held(self) -> bool:
        return (self.lost_or_changed == 0 and self.duplicate_params == 0
                and self.running_after == 0 and self.finished_after >= self.target_trials)


def search_command(study: str, work: Path, trials: int) -> list[str]:
    return [*DIFFNAS, "search", "--preset", "smoke", "--study", study, "--results", str(work),
            "--workers", "2", "--trials", str(trials)]


def storage_url(work: Path) -> str:
    return f"sqlite:///{work / 'diffnas.db'}"


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A new session: the kill of a coordinator must not take this script with it, and
    # whatever it leaves running can be found and reaped by its session.
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"), env=env, start_new_session=True)


def find_target(proc: subprocess.Popen[bytes], target: str) -> psutil.Process | None:
    """The process to kill among ``proc``'s descendants (or ``proc`` itself)."""
    if target == "coordinator":
        return psutil.Process(proc.pid)
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in family:
        try:
            line = " ".join(child.cmdline())
            name = child.name()
        except psutil.Error:
            continue
        if target == "raylet" and name == "raylet":
            return child
        if target == "actor" and line.startswith("ray::DeviceWorker"):
            return child
        if target == "trial" and _is_trial(child, line):
            return child
    return None


def _is_trial(proc: psutil.Process, line: str) -> bool:
    """A trial process: spawned (``python -m workers.trial``), or forked by its worker's
    warm process (``workers.forkserver``), whose children carry the same command line."""
    if "workers.trial" in line:
        return True
    try:
        parent = " ".join(proc.parent().cmdline()) if proc.parent() else ""
    except psutil.Error:
        return False
    return "workers.forkserver" in line and "workers.forkserver" in parent


def reap(pids: set[int]) -> None:
    """Kill what a killed run left behind (its Ray processes, its trial processes)."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def family_of(proc: subprocess.Popen[bytes]) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
    except psutil.NoSuchProcess:
        return {proc.pid}


def wait(proc: subprocess.Popen[bytes], limit_s: float = RUN_LIMIT_S) -> int:
    """Wait for ``proc``, reaping its leftovers; a run over its limit is killed (exit -9)."""
    seen = family_of(proc)
    deadline = time.time() + limit_s
    while proc.poll() is None and time.time() < deadline:
        seen |= family_of(proc)
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    reap(seen - {proc.pid})
    return code


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def snapshot(work: Path, study: str) -> dict[int, tuple[str, tuple[float, ...]]]:
    """COMPLETE trials: number -> (params as JSON, values)."""
    try:
        trials = optuna.load_study(study_name=study, storage=storage_url(work)).get_trials(
            deepcopy=False)
    except KeyError:
        return {}
    return {t.number: (json.dumps(t.params, sort_keys=True), tuple(t.values or ()))
            for t in trials if t.state == TrialState.COMPLETE}


def check(work: Path, study: str, before: dict[int, tuple[str, tuple[float, ...]]]
          ) -> dict[str, int]:
    from search.storage.study import is_finished

    trials = optuna.load_study(study_name=study, storage=storage_url(work)).get_trials(
        deepcopy=False)
    after = {t.number: t for t in trials}
    lost = sum(1 for n, (params, values) in before.items()
               if n not in after or after[n].state != TrialState.COMPLETE
               or json.dumps(after[n].params, sort_keys=True) != params
               or tuple(after[n].values) != values)
    complete = [json.dumps(t.params, sort_keys=True) for t in trials
                if t.state == TrialState.COMPLETE]
    return {"lost_or_changed": lost, "duplicate_params": len(complete) - len(set(complete)),
            "running_after": sum(t.state == TrialState.RUNNING for t in trials),
            "finished_after": sum(is_finished(t) for t in trials)}


def inject(round_: int, study: str, trials: int, target: str, delay_s: float, work: Path
           ) -> Kill:
    """One kill in a run of ``study`` towards ``trials`` finished trials, then resumes
    until a run exits 0."""
    log = work / f"{study}-{round_}-killed.log"
    proc = start(search_command(study, work, trials), log)
    seen = family_of(proc)
    deadline = time.time() + delay_s
    victim = None
    while time.time() < deadline + 60 and proc.poll() is None:
        seen |= family_of(proc)
        if time.time() >= deadline:
            victim = find_target(proc, target)
            if victim is not None:
                break
        time.sleep(0.2)
    killed = None
    if victim is not None:
        killed = victim.pid
        victim.send_signal(signal.SIGKILL)
    time.sleep(1.0)
    if target == "coordinator":
        proc.wait()
        seen |= family_of(proc)
        reap(seen - {proc.pid})
        code = proc.returncode
    else:
        code = wait(proc)
    before = snapshot(work, study)
    resumes = 0
    resumed = code
    while resumed != 0 and resumes < 3:
        resumes += 1
        resumed = wait(start(search_command(study, work, trials),
                             work / f"{study}-{round_}-r{resumes}.log"))
    return Kill(round=round_, study=study, target=target, delay_s=round(delay_s, 1),
                killed_pid=killed, run_exit=code, run_last_line=last_line(log),
                resumes=resumes, complete_before=len(before), target_trials=trials,
                **check(work, study, before))


# ---- bad input ------------------------------------------------------------------------

def bad_inputs(work: Path) -> list[tuple[str, list[str]]]:
    """(what, argv) pairs: each must fail with one line and leave stored results intact."""
    db = f"sqlite:///{work / 'diffnas.db'}"
    files = work / "bad"
    files.mkdir(parents=True, exist_ok=True)
    (files / "empty.toml").write_text("")
    (files / "not.toml").write_text("[study\ntrials = ")
    (files / "types.toml").write_text((ROOT / "search/presets/smoke.toml").read_text()
                                      .replace("steps = 30", "steps = true"))
    (files / "huge.toml").write_text((ROOT / "search/presets/smoke.toml").read_text()
                                     .replace("base_width = { choice = [8, 16] }",
                                              "base_width = 1000000000"))
    (files / "a-file").write_text("x")
    corrupt = files / "corrupt.db"
    if (work / "diffnas.db").exists():
        data = bytearray((work / "diffnas.db").read_bytes())
        mid = len(data) // 2
        data[mid:mid + 8192] = os.urandom(min(8192, len(data) - mid))
        corrupt.write_bytes(bytes(data))
    search = ["search", "--preset", "smoke", "--results", str(work), "--storage", db]
    return [
        ("missing dataset", ["search", "--space", str(_space_with(files, "nodata.toml",
                             'dataset = "digits"', f'dataset = "{files}/nothing"')),
                             *search[3:], "--study", "bad-data"]),
        ("space file missing", ["search", "--space", str(files / "nope.toml"), *search[3:]]),
        ("empty space file", ["search", "--space", str(files / "empty.toml"), *search[3:]]),
        ("space file not TOML", ["search", "--space", str(files / "not.toml"), *search[3:]]),
        ("config type: steps = true", ["search", "--space", str(files / "types.toml"),
                                       *search[3:], "--study", "bad-types"]),
        ("absurd base_width", ["search", "--space", str(files / "huge.toml"), *search[3:],
                               "--study", "bad-huge"]),
        ("unknown preset", ["search", "--preset", "nope", *search[3:]]),
        ("--trials 0", [*search, "--study", "bad-t0", "--trials", "0"]),
        ("--trials -1", [*search, "--study", "bad-t1", "--trials", "-1"]),
        ("--workers 0", [*search, "--study", "bad-w0", "--workers", "0"]),
        ("--max-retries -1", [*search, "--study", "bad-r", "--max-retries", "-1"]),
        ("--timeout -5", [*search, "--study", "bad-to", "--timeout", "-5"]),
        ("unreachable --address", [*search, "--study", "bad-addr", "--address",
                                   "127.0.0.1:1"]),
        ("study name with ..", [*search, "--study", "../../tmp/evil"]),
        ("absolute study name", [*search, "--study", "/tmp/evil"]),
        ("unknown pruner", [*search, "--study", "bad-pr", "--pruner", "nope"]),
        ("storage under a file", [*search[:-1], f"sqlite:///{files / 'a-file'}/x.db",
                                  "--study", "bad-under"]),
        ("results under a file", ["search", "--preset", "smoke", "--results",
                                  str(files / "a-file" / "r"), "--study", "bad-res"]),
        ("unreachable PostgreSQL (password in URL)",
         [*search[:-1], "postgresql://u:s3cret@127.0.0.1:1/db", "--study", "bad-pg"]),
        ("corrupt SQLite file", ["status", "f0", "--storage", f"sqlite:///{corrupt}"]),
        ("unknown study: status", ["status", "no-such-study", "--storage", db]),
        ("unknown study: pareto", ["pareto", "no-such-study", "--storage", db]),
        ("unknown trial: export", ["export", "f0", "999", "--out", str(files / "out"),
                                   "--storage", db]),
        ("export --out onto a file", ["export", "f0", "0", "--out", str(files / "a-file"),
                                      "--storage", db]),
        ("sample --n 0", ["sample", str(files / "no-model"), "--n", "0"]),
        ("sample --steps 0", ["sample", str(files / "no-model"), "--steps", "0"]),
        ("corrupt checkpoint", ["sample", str(_corrupt_model(files)), "--n", "4"]),
    ]


def _space_with(folder: Path, name: str, old: str, new: str) -> Path:
    path = folder / name
    path.write_text((ROOT / "search/presets/smoke.toml").read_text().replace(old, new))
    return path


def _corrupt_model(folder: Path) -> Path:
    model = folder / "corrupt-model"
    model.mkdir(exist_ok=True)
    for name in ("weights.safetensors", "config.json"):
        (model / name).write_bytes(os.urandom(256))
    return model


def run_bad_inputs(work: Path) -> list[dict[str, Any]]:
    rows = []
    for what, argv in bad_inputs(work):
        before = _digest(work / "diffnas.db")
        start_s = time.time()
        try:
            done = subprocess.run([*DIFFNAS, *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
            code, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired as timeout:
            code, err = None, (timeout.stderr or b"").decode(errors="replace")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        rows.append({"input": what, "argv": argv, "exit": code,
                     "seconds": round(time.time() - start_s, 1),
                     "one_line": len(lines) == 1, "message": lines[-1][:160] if lines else "",
                     "storage_intact": _digest(work / "diffnas.db") == before})
        print(f"  {what}: exit {code}, {len(lines)} line(s): {rows[-1]['message']}",
              flush=True)
    return rows


def _digest(path: Path) -> tuple[str, ...] | None:
    """The stored studies and trials (not the file's bytes: SQLite may rewrite pages)."""
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT trial_id, number, state FROM trials ORDER BY trial_id")
        return tuple(map(str, rows.fetchall()))


# ---- driver ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--kills-per-study", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "results" / "faults")
    p.add_argument("--json", type=Path)
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    p.add_argument("--skip-bad-input", action="store_true")
    p.add_argument("--bad-input-only", action="store_true")
    args = p.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    kills = [] if args.bad_input_only else run_kills(args)
    bad = [] if args.skip_bad_input else run_bad_inputs(args.work)
    summary = summarise(kills, bad)
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({"kills": [asdict(k) | {"held": k.held} for k in kills],
                                         "bad_input": bad, "summary": summary}, indent=1))
    return 0


def run_kills(args: argparse.Namespace) -> list[Kill]:
    rng = random.Random(args.seed)
    kills: list[Kill] = []
    round_ = 0
    while sum(k.killed_pid is not None for k in kills) < args.kills:
        study = f"f{round_ // args.kills_per_study}"
        # each kill in a study raises its target, so that every run has trials left to do
        trials = TARGET_TRIALS * (round_ % args.kills_per_study + 1)
        target = TARGETS[round_ % len(TARGETS)] if round_ < len(TARGETS) else rng.choice(
            TARGETS)
        kill = inject(round_, study, trials, target, rng.uniform(*DELAY_S), args.work)
        kills.append(kill)
        print(f"round {round_}: {target} of {study} after {kill.delay_s} s "
              f"(pid {kill.killed_pid}), exit {kill.run_exit} '{kill.run_last_line}', "
              f"{kill.resumes} resume(s): held={kill.held}", flush=True)
        round_ += 1
    return kills


def summarise(kills: list[Kill], bad: list[dict[str, Any]]) -> str:
    done = [k for k in kills if k.killed_pid is not None]
    lines = []
    if kills:
        by = {t: sum(k.target == t for k in done) for t in TARGETS}
        lines.append(f"kills: {sum(k.held for k in done)}/{len(done)} held all four "
                     f"invariants ({', '.join(f'{t} {n}' for t, n in by.items())}; "
                     f"{len(kills) - len(done)} rounds found no target alive)")
    if bad:
        lines.append(f"bad input: {sum(r['exit'] not in (0, None) for r in bad)}/{len(bad)} "
                     f"non-zero exit, {sum(r['one_line'] for r in bad)}/{len(bad)} one line, "
                     f"{sum(r['storage_intact'] for r in bad)}/{len(bad)} storage intact")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
