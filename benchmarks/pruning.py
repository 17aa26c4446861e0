#!/usr/bin/env python3
"""Pruners side by side: hypervolume against device-seconds for none, constraints, mo-asha.

  uv run python benchmarks/pruning.py [--budget 150] [--seeds 0 1 2] [--workers 2]
      [--work /tmp/diffnas-bench-pruning] [--out benchmarks/pruning.md]
      [--pruners none constraints mo-asha mo-asha-plain]

Every (pruner, seed) is a fresh study of the same 8 px space (:data:`SPACE`) on an
embedded Ray cluster, with the same sampler seed for the three pruners, and runs until
its finished trials have spent ``--budget`` device-seconds (in-flight trials then
finish, so each study overshoots by at most ``--workers`` trials). A trial's
device-seconds are its recorded ``timings.cpu_s`` (the CPU time of the trial's child
process, which counts on a shared machine what wall time does not); a trial pruned at
stage 0 costs none. The hypervolume of the feasible COMPLETE trials is followed trial by
trial, in the order they finished, against one reference point shared by all studies
(10% past the worst feasible point of any of them).

Target (issue 4): mo-asha reaches >= 95% of none's final hypervolume with <= 50% of
none's device-seconds.

  uv run python benchmarks/pruning.py --diagnose WORK [WORK ...]

reads the studies stored in those work folders instead (no training): how well the rung
proxy ranks the final FID, and their completed trials replayed in random orders through
the rung rules (:func:`replay`), with how many of the rung prunes were mistakes.

``mo-asha-plain`` (an ablation, not in the default list) is mo-asha without the
one-rung-ahead rule: every dominated trial outside a rung's top 1/eta stops. A study's
cache (``WORK/<pruner>-s<seed>-b<budget>.json``) is read back instead of run again, so
a changed pruner is measured against the same ``none`` and ``constraints`` studies by
deleting only its caches. The 1-minute load average before and after each study is
recorded: latency is wall time, so a loaded machine makes candidates slower (and some
of them infeasible) in that study only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from budgeted import (
    BudgetRun,
    budget_arguments,
    device_seconds,
    finished_in_order,
    hv_at,
    hv_curves,
    install,
    mean_spread,
    reference_line,
    run_cached,
    run_interleaved,
    write_report,
)
from optuna.trial import FrozenTrial, TrialState

from search import pareto
from search.pruning.base import Cost
from search.pruning import base as pruning
from search.pruning.mo_asha import MoAshaPruner
from search.space import parse_space
from search.storage import record as rec
from search.storage import study as st
from workers.records import Measurement, RungReport

PRUNERS = ("none", "constraints", "mo-asha")
ABLATIONS = {"mo-asha-plain": lambda space: MoAshaPruner(space, one_rung_ahead=False)}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SPACE = """\
# benchmarks/pruning.py: a smoke-sized space at 8 px where rungs matter (90 steps).
[study]
trials = 100000        # the device-second budget ends each study
sampler = "tpe"
startup_trials = 8

[data]
dataset = "digits"
image_size = 8

[evaluate]
fid_samples = 64
grid_images = 16
memory = "sample"

[rungs]
min_steps = 10         # rungs at 10, 30 and 90 (the end)
eta = 3

[constraints]
max_params = 300_000   # base_width 24 is over
max_latency_ms = 40    # many sampling steps at base_width 16 are over

[unet]
base_width = { choice = [8, 16, 24] }
width_mults = { choice = [[1, 2], [1, 2, 2]] }
norm_groups = 4
time_emb_dim = 32
activation = { choice = ["relu", "silu"] }

[schedule]
sampler = { choice = ["ddim", "euler"] }
steps = { int = [2, 8] }
spacing = "trailing"
beta_schedule = "cosine"
prediction = "eps"

[train]
steps = 90
batch_size = 8
learning_rate = { float = [1e-4, 1e-2], log = true }
warmup_steps = 5
eval_every = 10
"""


@dataclass(kw_only=True)
class Run(BudgetRun):
    """One finished study, reduced to what the table needs."""

    pruner: str
    stages: dict[str, int] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-min load average, before and after



def stage_of(t: FrozenTrial) -> str:
    """complete, failed, or where it was pruned: stage0, stage1, rung."""
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state != TrialState.PRUNED:
        return "failed"
    if t.user_attrs.get(rec.PRESCREEN, {}).get("decision") == "prune" or rec.PRESCREEN not in t.user_attrs:
        return "stage0"
    return "rung" if t.user_attrs.get(rec.RUNGS) else "stage1"


def summarise(pruner: str, seed: int, trials: list[FrozenTrial], wall_s: float) -> Run:
    run = Run(pruner=pruner, seed=seed, wall_s=wall_s)
    for t in finished_in_order(trials):
        run.add(t)
        run.stages[stage_of(t)] = run.stages.get(stage_of(t), 0) + 1
    return run


def seconds_to(run: Run, curve: np.ndarray, level: float) -> float:
    """Device-seconds spent when the hypervolume first reached ``level`` (inf: never)."""
    hit = np.flatnonzero(curve >= level)
    return float(run.spent[hit[0]]) if len(hit) else math.inf


def load_or_run(work: Path, space: Path, pruner: str, seed: int, workers: int, budget: float
                ) -> Run:
    """The study of ``pruner`` and ``seed``, with the load average before and after it."""
    load = os.getloadavg()[0]

    def summary(trials: list[FrozenTrial], wall_s: float) -> Run:
        run = summarise(pruner, seed, trials, wall_s)
        run.load = [load, os.getloadavg()[0]]
        return run

    return run_cached(work, f"{pruner}-s{seed}-b{budget:g}", Run, summary, space=space,
                      workers=workers, pruner=pruner, seed=seed)


# -- the report --------------------------------------------------------------------------



def tables(runs: list[Run], budget: float) -> tuple[str, dict[str, Any]]:
    reference, curves = hv_curves(runs, lambda r: r.pruner)
    base = {r.seed: r for r in runs if r.pruner == "none"}
    head = ("| pruner | trials: complete / pruned stage 0 / stage 1 / rung (failed) | device-s | "
            + " | ".join(f"HV at {f:.0%} of budget" for f in FRACTIONS) + " | final HV / none's |")
    lines = [reference_line(reference, budget), "", head, "|---" * (4 + len(FRACTIONS)) + "|"]
    for pruner in dict.fromkeys([*PRUNERS, *(r.pruner for r in runs)]):
        mine = [r for r in runs if r.pruner == pruner]
        if not mine:
            continue
        counts = " / ".join(mean_spread([r.stages.get(k, 0) for r in mine])
                            for k in ("complete", "stage0", "stage1", "rung"))
        failed = sum(r.stages.get("failed", 0) for r in mine)
        at = [mean_spread([hv_at(r, curves[(pruner, r.seed)], f * budget) for r in mine])
              for f in FRACTIONS]
        ratio = [curves[(pruner, r.seed)][-1] / curves[("none", r.seed)][-1] for r in mine
                 if r.seed in base and curves[("none", r.seed)][-1] > 0]
        lines.append(f"| {pruner} ({len(mine)} seeds) | {counts} ({failed}) | "
                     f"{mean_spread([r.spent[-1] for r in mine])} | {' | '.join(at)} | "
                     f"{mean_spread(ratio) if ratio else '-'} |")
    target, doc = target_table(runs, curves, base)
    return "\n".join(lines) + "\n\n" + target, {"reference": reference.tolist(), **doc}


def target_table(runs: list[Run], curves: dict[tuple[str, int], np.ndarray],
                 base: dict[int, Run]) -> tuple[str, dict[str, Any]]:
    """Per seed: mo-asha's HV at half of none's device-seconds, and the share it needed
    (one table per mo-asha label; constraints' HV at half for context)."""
    labels = [p for p in dict.fromkeys(r.pruner for r in runs) if p.startswith("mo-asha")]
    texts: list[str] = []
    doc: dict[str, Any] = {}
    for label in labels:
        text, numbers = _target(label, runs, curves, base)
        texts.append(text)
        doc.update(numbers if label == "mo-asha" else {label: numbers})
    return "\n\n".join(texts), doc


def _target(label: str, runs: list[Run], curves: dict[tuple[str, int], np.ndarray],
            base: dict[int, Run]) -> tuple[str, dict[str, Any]]:
    other = {r.seed: r for r in runs if r.pruner == "constraints"}
    head = (f"| seed | none: final HV, device-s | {label} HV at 50% of none's device-s (share "
            f"of none's final) | device-s {label} needed for 95% of none's final HV (share of "
            f"none's) | constraints HV at 50% (share) | load none / {label} |")
    lines = [f"**{label}**", "", head, "|---|---|---|---|---|---|"]
    shares, halves = [], []
    for r in sorted((r for r in runs if r.pruner == label and r.seed in base),
                    key=lambda r: r.seed):
        none = base[r.seed]
        final, spent = float(curves[("none", r.seed)][-1]), none.spent[-1]
        half = hv_at(r, curves[(label, r.seed)], 0.5 * spent) / final
        need = seconds_to(r, curves[(label, r.seed)], 0.95 * final) / spent
        c = other.get(r.seed)
        ctx = (f"{hv_at(c, curves[('constraints', r.seed)], 0.5 * spent) / final:.1%}"
               if c else "-")
        loads = " / ".join("-" if not x.load else "{:.1f}-{:.1f}".format(*x.load)
                           for x in (none, r))
        shares.append(need)
        halves.append(half)
        lines.append(f"| {r.seed} | {final:.4g}, {spent:.0f} | {half:.1%} | "
                     f"{'never' if math.isinf(need) else f'{need:.1%}'} | {ctx} | {loads} |")
    met = bool(shares) and all(h >= 0.95 for h in halves)
    mean = f"{np.mean(halves):.1%}" if halves else "-"
    verdict = (f"Target for {label} (>= 95% of none's final HV with <= 50% of its "
               f"device-seconds): {'met' if met else 'missed'}; reached on "
               f"{sum(h >= 0.95 for h in halves)} of {len(halves)} seeds (mean over seeds "
               f"{mean}).")
    lines += ["", verdict]
    return "\n".join(lines), {"share_needed": shares, "hv_at_half": halves, "met": met}


def markdown(runs: list[Run], budget: float, args: argparse.Namespace, wall_s: float) -> str:
    body, _ = tables(runs, budget)
    device = next((r.device for r in runs if r.device), {})
    return (f"# Pruners: hypervolume against device-seconds\n\n"
            f"`uv run python benchmarks/pruning.py --budget {budget:g} --seeds "
            f"{' '.join(map(str, args.seeds))} --workers {args.workers}"
            f"{'' if args.pruners == list(PRUNERS) else ' --pruners ' + ' '.join(args.pruners)}` "
            f"({wall_s / 60:.1f} min wall).\n\n"
            f"Device: {json.dumps(device, sort_keys=True)}\n\n{body}\n")


# -- diagnosis: the proxy against the final FID, and rung rules replayed -----------------


def recorded(folders: list[Path]) -> list[dict[str, Any]]:
    """Every COMPLETE trial with all its rungs, under the parameter limit (stage-0
    feasible), from the studies stored in ``folders``."""
    space = parse_space(SPACE)
    limit = space.constraints.max_params or math.inf
    rows = []
    for folder in folders:
        storage = st.open_storage(st.default_storage(folder), create=False)
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                rungs = {int(r["step"]): r for r in t.user_attrs.get(rec.RUNGS, [])}
                if sorted(rungs) != list(space.rungs.steps(90)):
                    continue
                if t.user_attrs.get(rec.PRESCREEN, {}).get("params", 0) > limit:
                    continue
                m = t.user_attrs[rec.MEASURED]
                rows.append({"study": summary.study_name, "values": list(t.values),
                             "feasible": st.feasible(t), "cpu_s": device_seconds(t),
                             "lr": t.params["train.learning_rate"],
                             "steps": t.params["schedule.steps"],
                             "proxy": {s: float(r["val_loss"]) for s, r in rungs.items()},
                             "elapsed": {s: float(r["elapsed_s"]) for s, r in rungs.items()},
                             "latency": float(m["latency_ms"]), "memory": float(m["sample_mb"])})
    return rows


def spearman(x: Any, y: Any) -> float:
    rx, ry = (np.argsort(np.argsort(np.asarray(v, float))) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def proxy_report(rows: list[dict[str, Any]]) -> str:
    """Rank correlations: rung 10 against the end, and the proxy against the final FID."""
    v10 = np.array([r["proxy"][10] for r in rows])
    v90 = np.array([r["proxy"][90] for r in rows])
    fid = np.array([r["values"][0] for r in rows])
    good = v10 <= np.median(v10)
    lr, steps = (np.array([r[k] for r in rows]) for k in ("lr", "steps"))
    return (f"{len(rows)} complete trials: rho(val loss at 10, at 90) = {spearman(v10, v90):.2f}; "
            f"rho(val loss at 10, FID) = {spearman(v10, fid):.2f}. The better half by val loss "
            f"at 10 ({good.sum()}): rho(val loss, FID) = {spearman(v10[good], fid[good]):.2f}, "
            f"rho(learning rate, FID) = {spearman(lr[good], fid[good]):.2f}, rho(sampling "
            f"steps, FID) = {spearman(steps[good], fid[good]):.2f}.")


def replay(rows: list[dict[str, Any]], make: Any, order: np.ndarray, budget: float,
           reference: np.ndarray) -> tuple[float, int, int, float]:
    """One random order of recorded trials through a pruner (``make()``; None: no rung
    pruning), one after the other, until ``budget`` device-seconds are spent. A trial over
    the latency limit stops at stage 1 (0.5 device-s); one pruned at step s costs 0.55 +
    cpu_s * elapsed(s) / elapsed(90). Returns the hypervolume of the completed feasible
    points, the rung prunes, those whose final point would have raised that hypervolume,
    and by how much together."""
    space = parse_space(SPACE)
    limit = space.constraints.max_latency_ms or math.inf
    pruner = make() if make else None
    spent, points, pruned = 0.0, [], []
    for k, i in enumerate(order):
        if spent >= budget:
            break
        r = rows[int(i)]
        if r["latency"] > limit:
            spent += 0.5
            continue
        stop = None
        if pruner is not None:
            m = Measurement(r["latency"], 0.0, (r["latency"],), train_mb=r["memory"],
                            sample_mb=r["memory"], seconds=0.0)
            pruner.prescreen(k, Cost(1, 1, 90))
            pruner.on_measured(k, m)
            for step in sorted(r["proxy"]):
                rung = RungReport(step, r["proxy"][step], r["proxy"][step], r["elapsed"][step])
                if not pruner.on_rung(k, rung, m).proceed:
                    stop = step
                    break
        if stop is None:
            spent += r["cpu_s"]
            if r["feasible"]:
                points.append(r["values"])
        else:
            spent += min(r["cpu_s"], 0.55 + r["cpu_s"] * r["elapsed"][stop] / r["elapsed"][90])
            pruned.append(r)
    hv = pareto.hypervolume(np.array(points), reference.tolist()) if points else 0.0
    gains = [pareto.hypervolume(np.array([*points, r["values"]]), reference.tolist()) - hv
             for r in pruned if r["feasible"]]
    return hv, len(pruned), sum(g > 1e-9 for g in gains), float(sum(gains))


def diagnose(folders: list[Path], orders: int = 200, seed: int = 0) -> str:
    rows = recorded(folders)
    space = parse_space(SPACE)
    reference = pareto.default_reference(np.array([r["values"] for r in rows if r["feasible"]]))
    rules = {"constraints (no rung pruning)": None,
             "mo-asha-plain": lambda: MoAshaPruner(space, one_rung_ahead=False),
             "mo-asha": lambda: MoAshaPruner(space)}
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(len(rows)) for _ in range(orders)]
    shown = ", ".join(f"{v:.4g}" for v in reference)
    head = ("| rule | HV at 30 / 60 / 120 device-s | rung prunes per order at 60 s | "
            "of which raised the HV had they completed | HV they would have added |")
    lines = [proxy_report(rows), "",
             f"Replay: {orders} random orders of these trials, reference ({shown}).", "",
             head, "|---|---|---|---|---|"]
    for name, make in rules.items():
        hv = [[replay(rows, make, o, b, reference)[0] for o in shuffled] for b in (30, 120)]
        at60 = np.array([replay(rows, make, o, 60, reference) for o in shuffled])
        lines.append(f"| {name} | {np.mean(hv[0]):.1f} / {at60[:, 0].mean():.1f} / "
                     f"{np.mean(hv[1]):.1f} | {at60[:, 1].mean():.1f} | "
                     f"{at60[:, 2].sum() / max(at60[:, 1].sum(), 1):.0%} | "
                     f"{at60[:, 3].mean():.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget_arguments(p, "/tmp/diffnas-bench-pruning")
    p.add_argument("--pruners", nargs="+", default=list(PRUNERS),
                   choices=[*PRUNERS, *ABLATIONS], help="none must be among them")
    p.add_argument("--diagnose", type=Path, nargs="+", metavar="WORK",
                   help="only analyse the studies stored in these work folders")
    args = p.parse_args(argv)
    if args.diagnose:
        print(diagnose(args.diagnose))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    space = args.work / "space.toml"
    space.write_text(SPACE)
    install(args.budget)
    pruning.PRUNERS.update(ABLATIONS)  # this process only: the ablation is no CLI choice
    start = time.time()
    runs = run_interleaved(args.seeds, args.pruners, lambda pruner, seed: load_or_run(
        args.work, space, pruner, seed, args.workers, args.budget))
    text = markdown(runs, args.budget, args, time.time() - start)
    print(text)
    write_report(args.out, text, tables(runs, args.budget)[1], runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
