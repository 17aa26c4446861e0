#!/usr/bin/env python3
"""Mutation proposals with weight inheritance, and adaptation during training, on or off:
hypervolume against device-seconds.

  uv run python benchmarks/evolution.py [--budget 150] [--seeds 0 1 2] [--workers 2]
      [--arms sampler evolution adapt] [--work /tmp/diffnas-bench-evolution]
      [--out benchmarks/evolution.md]

The arms share the space :data:`SPACE` and the sampler seeds; only ``[study]``,
``[adapt]`` and ``[constraints]`` differ:

- ``sampler``: ``mutation_rate = 0``, every candidate comes from TPE and trains from scratch;
- ``evolution``: ``mutation_rate = 0.25``: a quarter of the candidates mutate a trial of
  the current Pareto front (search.hooks.evolution), start from its weights morphed to the new
  architecture (engine.model.morph.inherit) and train for ``inherit_budget = 0.5`` of the steps;
- ``budget``: ``sampler`` under a latency limit (``[constraints] max_latency_ms``) with the
  ``constraints`` pruner: a candidate measured over it stops before training;
- ``shrink``: the same limit, but a candidate over it trains to its first rung and then
  shrinks (``[adapt] shrink_above_ms``, search.hooks.adapt) into a new trial one morphism
  smaller, which continues from its weights for the steps it had left.

``evolution`` is compared with ``sampler``, ``shrink`` with ``budget``.

Every (arm, seed) is a fresh study on an embedded Ray cluster that runs until its finished
trials have spent ``--budget`` device-seconds (a trial's ``timings.cpu_s``, the CPU time of
its child process; the trials in flight then finish). The hypervolume of the feasible
COMPLETE trials is followed in the order they finished, against one reference point for
all studies: 10% past the worst point of any of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from budgeted import (
    BudgetRun,
    budget_arguments,
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
from optuna.trial import FrozenTrial

from search import pareto
from search.storage import lineage as lin
from search.storage import record as rec

LIMIT = "max_latency_ms = 12"  # about the median latency of the space's candidates
ARMS = {"sampler": {"study": "mutation_rate = 0.0"},
        "evolution": {"study": "mutation_rate = 0.25\ninherit_budget = 0.5"},
        "budget": {"study": 'pruner = "constraints"', "constraints": LIMIT},
        "shrink": {"constraints": LIMIT, "adapt": "shrink_above_ms = 12"}}
BASELINE = {"evolution": "sampler", "shrink": "budget"}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SPACE = """\
# benchmarks/evolution.py: 8 px, architectures whose neighbours engine.model.morph can reach.
[study]
trials = 100000        # the device-second budget ends each study
sampler = "tpe"
startup_trials = 8
{study}

[adapt]
{adapt}

[constraints]
{constraints}

[rungs]                # at validation points (no extra work); nothing is pruned
min_steps = 30
eta = 2

[data]
dataset = "digits"
image_size = 8

[evaluate]
fid_samples = 64
grid_images = 16
memory = "sample"

[unet]
base_width = {{ choice = [8, 16, 32] }}          # x2 and /2 are morphisms
width_mults = {{ choice = [[1, 2], [2, 2], [1, 4]] }}
num_res_blocks = {{ int = [1, 2] }}
attn_levels = {{ choice = [[], [1]] }}
head_dim = 8
norm_groups = 4
time_emb_dim = 32
activation = {{ choice = ["relu", "silu"] }}

[schedule]
sampler = {{ choice = ["ddim", "euler"] }}
steps = {{ int = [2, 8] }}
spacing = "trailing"
beta_schedule = "cosine"
prediction = "eps"

[train]
steps = 90
batch_size = 8
learning_rate = {{ float = [3e-4, 1e-2], log = true }}
warmup_steps = 5
eval_every = 30
"""


@dataclass(kw_only=True)
class Run(BudgetRun):
    """One finished study, reduced to what the tables need."""

    arm: str
    kinds: list[str] = field(default_factory=list)  # sampled | inherited | fresh | adapted

    def costs(self) -> np.ndarray:
        """The device-seconds of each trial, in finish order."""
        return np.diff(self.spent, prepend=0.0)


def kind_of(t: FrozenTrial) -> str:
    if lin.PARENT not in t.user_attrs:
        return "sampled"
    if lin.ADAPTATION in t.user_attrs:
        return "adapted"
    return t.user_attrs.get(rec.INHERITANCE, {}).get("status", "fresh")


def summarise(arm: str, seed: int, trials: list[FrozenTrial], wall_s: float) -> Run:
    run = Run(arm=arm, seed=seed, wall_s=wall_s)
    for t in finished_in_order(trials):
        run.kinds.append(kind_of(t) if run.add(t) else "not complete")
    return run


def load_or_run(work: Path, arm: str, seed: int, workers: int, budget: float) -> Run:
    """The study of ``arm`` and ``seed`` (its space written to ``work/<arm>.toml``)."""
    space = work / f"{arm}.toml"
    space.write_text(SPACE.format(**{"study": "", "adapt": "", "constraints": "", **ARMS[arm]}))
    return run_cached(work, f"{arm}-s{seed}-b{budget:g}", Run,
                      lambda trials, wall_s: summarise(arm, seed, trials, wall_s),
                      space=space, workers=workers, seed=seed)


# -- the report --------------------------------------------------------------------------



def tables(runs: list[Run], budget: float) -> tuple[str, dict[str, Any]]:
    reference, curves = hv_curves(runs, lambda r: r.arm)
    head = ("| arm | complete: sampled / inherited / fresh children / adapted | device-s per "
            "complete trial: sampled / inherited / adapted | final front: sampled / inherited "
            "/ adapted | device-s | "
            + " | ".join(f"HV at {f:.0%} of budget" for f in FRACTIONS) + " |")
    lines = [reference_line(reference, budget), "", head, "|---" * (5 + len(FRACTIONS)) + "|"]
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        if not mine:
            continue
        counts = " / ".join(mean_spread([r.kinds.count(k) for r in mine])
                            for k in ("sampled", "inherited", "fresh", "adapted"))
        cost = " / ".join(_mean_cost(mine, k) for k in ("sampled", "inherited", "adapted"))
        front = " / ".join(mean_spread([front_kinds(r).count(k) for r in mine])
                           for k in ("sampled", "inherited", "adapted"))
        at = [mean_spread([hv_at(r, curves[(arm, r.seed)], f * budget) for r in mine])
              for f in FRACTIONS]
        lines.append(f"| {arm} ({len(mine)} seeds) | {counts} | {cost} | {front} | "
                     f"{mean_spread([r.spent[-1] for r in mine])} | {' | '.join(at)} |")
    per_seed, ratios = seed_table(runs, curves, budget)
    doc = {"reference": reference.tolist(), "final_ratio": ratios}
    return "\n".join(lines) + "\n\n" + per_seed, doc


def front_kinds(run: Run) -> list[str]:
    """Where the trials of the study's final Pareto front came from."""
    done = [(p, k) for p, k in zip(run.points, run.kinds) if p is not None]
    mask = pareto.pareto_mask(np.array([p for p, _ in done]))
    return [k for (_, k), keep in zip(done, mask) if keep]


def _mean_cost(runs: list[Run], kind: str) -> str:
    costs = [c for r in runs for c, k in zip(r.costs(), r.kinds) if k == kind]
    return f"{np.mean(costs):.3g}" if costs else "-"


def seed_table(runs: list[Run], curves: dict[tuple[str, int], np.ndarray], budget: float
               ) -> tuple[str, dict[str, list[float]]]:
    """Per seed: each arm's HV at half and at the whole budget, and each arm / its baseline."""
    by = {(r.arm, r.seed): r for r in runs}
    arms = [a for a in ARMS if any(r.arm == a for r in runs)]
    pairs = [(a, b) for a, b in BASELINE.items() if a in arms and b in arms]
    head = ("| seed | " + " | ".join(f"{a} HV at 50% / 100%" for a in arms) + " | "
            + " | ".join(f"{a} / {b} at 100%" for a, b in pairs) + " |")
    lines = [head, "|---" * (1 + len(arms) + len(pairs)) + "|"]
    ratios: dict[str, list[float]] = {a: [] for a, _ in pairs}
    for seed in sorted({r.seed for r in runs}):
        if any((a, seed) not in by for a in arms):
            continue
        hv = {a: [hv_at(by[(a, seed)], curves[(a, seed)], f * budget) for f in (0.5, 1)]
              for a in arms}
        cells = [f"{hv[a][0]:.4g} / {hv[a][1]:.4g}" for a in arms]
        for a, b in pairs:
            ratios[a].append(hv[a][1] / hv[b][1] if hv[b][1] else math.inf)
            cells.append(f"{ratios[a][-1]:.3f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines), ratios


def markdown(runs: list[Run], budget: float, args: argparse.Namespace, wall_s: float) -> str:
    body, _ = tables(runs, budget)
    device = next((r.device for r in runs if r.device), {})
    return (f"`uv run python benchmarks/evolution.py --budget {budget:g} --seeds "
            f"{' '.join(map(str, args.seeds))} --workers {args.workers} --arms "
            f"{' '.join(args.arms)}` "
            f"({wall_s / 60:.1f} min wall).\n\n"
            f"Device: {json.dumps(device, sort_keys=True)}\n\n{body}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget_arguments(p, "/tmp/diffnas-bench-evolution")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    install(args.budget)
    start = time.time()
    runs = run_interleaved(args.seeds, args.arms, lambda arm, seed: load_or_run(
        args.work, arm, seed, args.workers, args.budget))
    text = markdown(runs, args.budget, args, time.time() - start)
    print(text)
    write_report(args.out, text, tables(runs, args.budget)[1], runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
