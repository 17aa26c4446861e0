#!/usr/bin/env python3
"""Replay every arm's search against the recorded table: anytime hypervolume per budget.

  uv run --with optunahub --with syne-tune==0.16 python benchmarks/searchbench/replay.py \
      --registry /work/peers/optunahub-registry/package [--seeds 20] [--budget-trials 40]
      [--arms ...] [--results results.jsonl] [--out-dir benchmarks/searchbench]

Each (arm, seed) runs sequentially (one worker) until it has spent the budget: the
device-seconds of ``--budget-trials`` full trials (the table's median). The hypervolume
of the feasible completed points is followed against device-seconds, against one
reference point for every arm: 10% past the worst feasible point of the whole table.
Writes ``hv.png`` (mean and 95% interval per arm), ``replay.md`` (HV at 25/50/100% of the
budget; device-seconds to reach the best peer's final HV) and ``replay.json`` (the curves).
The diffnas arms need no peer library (``uv run python ... --arms constraints mo-asha``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from arms import ARMS, DIFFNAS, PEERS, Played, run_arm
from recorded import Table, TableError, load_table

from search import pareto
from search.space_toml import SpaceError

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.25, 0.5, 1.0)
GRID = 401


def hv_steps(played: list[Played], reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative device-seconds and hypervolume after each played trial."""
    spent = np.cumsum([p.cost for p in played])
    hv, front = [], np.zeros((0, len(reference)))
    for p in played:
        if p.point is not None:
            pts = np.vstack([front, np.array(p.point, float)])
            front = pts[pareto.non_dominated_sort(pts) == 0]
        hv.append(pareto.hypervolume(front, reference.tolist()) if len(front) else 0.0)
    return spent, np.array(hv)


def curve_on(grid: np.ndarray, spent: np.ndarray, hv: np.ndarray) -> np.ndarray:
    """The hypervolume at each budget of ``grid``: of the trials finished within it."""
    done = np.searchsorted(spent, grid + 1e-9, side="right")
    return np.where(done > 0, hv[np.maximum(done - 1, 0)], 0.0)


def interval(values: np.ndarray, rng: np.random.Generator, draws: int = 2000
             ) -> tuple[np.ndarray, np.ndarray]:
    """95% bootstrap percentile interval of the mean over seeds (axis 0)."""
    picks = rng.integers(0, len(values), (draws, len(values)))
    means = values[picks].mean(axis=1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def _one(job: tuple[str, int, float, Table, Path | None]) -> tuple[str, int, list[Played]]:
    arm, seed, budget, table, registry = job
    return arm, seed, run_arm(arm, table, seed, budget, registry)


def replay(table: Table, arms: list[str], seeds: int, budget: float, registry: Path | None,
           jobs: int = 1) -> dict[tuple[str, int], list[Played]]:
    """Every arm with seeds ``0 .. seeds-1``."""
    work = [(arm, seed, budget, table, registry) for arm in arms for seed in range(seeds)]
    if jobs <= 1:
        done = [_one(w) for w in work]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            done = list(pool.map(_one, work))
    return {(arm, seed): played for arm, seed, played in done}


def summarise(table: Table, runs: dict[tuple[str, int], list[Played]], budget: float
              ) -> dict[str, Any]:
    """Curves on a common grid, their mean and interval, and the per-arm statistics."""
    reference = pareto.default_reference(table.points())
    grid = np.linspace(0.0, budget, GRID)
    rng = np.random.default_rng(0)
    arms: dict[str, Any] = {}
    for arm in dict.fromkeys(a for a, _ in runs):
        seeds = sorted(s for a, s in runs if a == arm)
        curves = np.array([curve_on(grid, *hv_steps(runs[(arm, s)], reference))
                           for s in seeds])
        low, high = interval(curves, rng)
        played = [runs[(arm, s)] for s in seeds]
        stops = {k: float(np.mean([sum(p.stop.split()[0] == k for p in ps) for ps in played]))
                 for k in ("complete", "stage0", "stage1", "rung", "failed")}
        arms[arm] = {"seeds": seeds, "curves": curves.tolist(), "mean": curves.mean(0).tolist(),
                     "low": low.tolist(), "high": high.tolist(), "stops": stops,
                     "trials": float(np.mean([len(ps) for ps in played])),
                     "distinct": float(np.mean([len({p.row for p in ps}) for ps in played])),
                     "distinct_all": len({p.row for ps in played for p in ps}),
                     "distance": float(np.mean([p.distance for ps in played for p in ps]))}
    return {"reference": reference.tolist(), "budget": budget, "grid": grid.tolist(),
            "arms": arms, "rows": len(table.rows), "synthetic": table.synthetic,
            "infeasible_share": 1 - len(table.points()) / max(
                sum(r.values is not None for r in table.rows), 1)}


def at(doc: dict[str, Any], arm: str, key: str, fraction: float) -> float:
    index = round(fraction * (len(doc["grid"]) - 1))
    return float(doc["arms"][arm][key][index])


def seconds_to(doc: dict[str, Any], arm: str, level: float) -> float:
    """Device-seconds at which ``arm``'s mean curve first reaches ``level`` (inf: never)."""
    hit = np.flatnonzero(np.array(doc["arms"][arm]["mean"]) >= level - 1e-12)
    return float(doc["grid"][hit[0]]) if len(hit) else math.inf


def verdict(doc: dict[str, Any]) -> str:
    """The issue's target for mo-asha against every peer present, with the margin of each
    criterion (positive: met by that much; negative: missed by that much)."""
    peers = [a for a in doc["arms"] if a in PEERS]
    if "mo-asha" not in doc["arms"] or not peers:
        return "Target: needs mo-asha and at least one peer arm."
    leads = {f: min((at(doc, "mo-asha", "mean", f) - at(doc, p, "mean", f), p) for p in peers)
             for f in FRACTIONS}
    gap, rival = min((at(doc, "mo-asha", "low", 0.5) - at(doc, p, "high", 0.5), p)
                     for p in peers)
    best = max(peers, key=lambda p: at(doc, p, "mean", 1.0))
    need = seconds_to(doc, "mo-asha", at(doc, best, "mean", 1.0)) / doc["budget"]
    share = ("never within the budget" if math.isinf(need)
             else f"with {need:.0%} of its device-seconds")
    ahead = all(lead > 0 for lead, _ in leads.values())
    margins = ", ".join(f"{f:.0%}: {lead:+.4g} over {p}" for f, (lead, p) in leads.items())
    return (f"Target (issue 15): mo-asha ahead of every peer at 25/50/100% of the budget: "
            f"{'yes' if ahead else 'no'} (smallest lead {margins}); 95% intervals apart "
            f"from every peer's at 50%: {'yes' if gap > 0 else 'no'} (mo-asha's lower end "
            f"{gap:+.4g} from {rival}'s upper end); reaches the best peer's ({best}) final HV "
            f"{share} (target: with <= 60%): {'yes' if need <= 0.6 else 'no'}.")


def markdown(doc: dict[str, Any], command: str, wall_s: float) -> str:
    peers = [a for a in doc["arms"] if a in PEERS]
    best = max(peers, key=lambda p: at(doc, p, "mean", 1.0)) if peers else None
    level = at(doc, best, "mean", 1.0) if best else math.nan
    head = ("| arm | seeds | trials: complete / stage 0 / stage 1 / rung / failed | distinct "
            "rows per seed (all seeds), mean distance | " + " | ".join(
                f"HV at {f:.0%} [95% CI]" for f in FRACTIONS)
            + f" | device-s to {best or '-'}'s final HV (share of budget) |")
    lines = [head, "|---" * (5 + len(FRACTIONS)) + "|"]
    for arm, a in doc["arms"].items():
        s = a["stops"]
        stops = " / ".join(f"{s[k]:.1f}" for k in ("complete", "stage0", "stage1", "rung",
                                                     "failed"))
        hvs = " | ".join(f"{at(doc, arm, 'mean', f):.4g} [{at(doc, arm, 'low', f):.4g}, "
                         f"{at(doc, arm, 'high', f):.4g}]" for f in FRACTIONS)
        need = seconds_to(doc, arm, level) if best else math.inf
        reach = "never" if math.isinf(need) else f"{need:.0f} ({need / doc['budget']:.0%})"
        lines.append(f"| {arm} | {len(a['seeds'])} | {a['trials']:.1f}: {stops} | "
                     f"{a['distinct']:.1f} ({a['distinct_all']}), {a['distance']:.3f} | {hvs} | "
                     f"{reach} |")
    banner = ("**SYNTHETIC TABLE: these numbers test the replay, they are not results.**\n\n"
              if doc["synthetic"] else "")
    shown = ", ".join(f"{v:.4g}" for v in doc["reference"])
    return (f"# Search benchmark replay\n\n{banner}`{command}` ({wall_s:.0f} s wall)\n\n"
            f"{doc['rows']} recorded configs ({doc['infeasible_share']:.0%} of the completed "
            f"ones infeasible); budget {doc['budget']:.0f} device-s per run; reference point "
            f"(fid, latency_ms, peak_mem_mb) ({shown}); one worker.\n\n"
            + "\n".join(lines) + f"\n\n{verdict(doc)}\n")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Mean hypervolume and its 95% interval per arm against device-seconds."""
    import matplotlib  # heavyweight: only when the figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.array(doc["grid"])
    for arm, a in doc["arms"].items():
        style = "-" if arm in DIFFNAS else "--"
        (line,) = ax.plot(grid, a["mean"], style, label=arm, lw=2 if arm == "mo-asha" else 1.2)
        ax.fill_between(grid, a["low"], a["high"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("device-seconds (CPU-s of the trial processes)")
    ax.set_ylabel("hypervolume (fid, latency, memory)")
    title = "Anytime hypervolume, mean and 95% interval over seeds"
    ax.set_title(("SYNTHETIC TABLE -- " if doc["synthetic"] else "") + title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    p.add_argument("--space", type=Path, default=HERE / "space.toml")
    p.add_argument("--plan", type=Path, default=HERE / "configs.json")
    p.add_argument("--registry", type=Path, help="the registry's package folder (mmp arms)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--budget-trials", type=float, default=40.0,
                   help="budget: this many full trials' device-seconds (the table's median)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.budget_trials <= 0:
        p.error("--seeds and --budget-trials must be positive")
    missing = [a for a in args.arms if a.startswith("mmp-")] if args.registry is None else []
    if missing:
        p.error(f"arms {', '.join(missing)} need --registry")
    try:
        table = load_table(args.results, args.space, args.plan)
    except (TableError, SpaceError, OSError) as err:
        print(f"replay: {err}", file=sys.stderr)
        return 2
    start = time.time()
    budget = args.budget_trials * table.full_cost()
    doc = summarise(table, replay(table, args.arms, args.seeds, budget, args.registry,
                                  args.jobs), budget)
    command = "python benchmarks/searchbench/replay.py " + " ".join(argv or sys.argv[1:])
    text = markdown(doc, command.strip(), time.time() - start)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "replay.md").write_text(text)
    (args.out_dir / "replay.json").write_text(json.dumps(doc))
    plot(doc, args.out_dir / "hv.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
