#!/usr/bin/env python3
"""Plan the recorded table: configs spread over the frozen space, written to configs.json.

  uv run python benchmarks/searchbench/plan.py [--bench main|heldout] [--n 256] [--seed 0]
      [--space benchmarks/searchbench/space.toml] [--out benchmarks/searchbench/configs.json]
      [--corners NAME ...]

``--bench`` picks a benchmark's defaults for the other options (:data:`BENCHES`): ``main``
(space.toml -> configs.json) or ``heldout`` (heldout/space.toml -> heldout/configs.json, the
held-out space, with fewer points and corners to fit its one recording run).

A Latin hypercube of ``--n`` points over the searched parameters (each parameter's range
cut into ``n`` equal strata, one point per stratum, strata paired at random; log-scaled
parameters are stratified in log space), plus the corners of the cost dimensions: every
architecture (``base_width`` x ``width_mults`` x ``attn_levels``) at the fewest and the
most sampling steps, the other parameters from a second hypercube. Those corners hold the
infeasible extremes (the widest and slowest candidates) and the cheapest ones. A point
that decodes to no valid config is dropped (counted in the file); duplicates are dropped.

configs.json carries everything the record step needs without importing ``search``: each
config as an ``engine.config.Config`` dict with its Optuna parameters, params and FLOPs,
and the space's data, evaluation, rung and constraint settings.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from recorded import params_fingerprint

from engine.model.cost import flops, param_count
from search.space import SearchSpace, load_space
from search.space_params import Param
from search.space_toml import SpaceError

HERE = Path(__file__).resolve().parent
CORNERS = ("unet.base_width", "unet.width_mults", "unet.attn_levels", "schedule.steps")
HELDOUT_CORNERS = ("unet.base_width", "schedule.steps")
"""The held-out space has 96 architecture x steps corners; every width at 4 and at 50
sampling steps (8) keeps its plan within one recording run."""


@dataclass(frozen=True)
class Bench:
    """A benchmark's plan defaults: its space file, plan file, points and corner dimensions."""

    space: Path
    out: Path
    n: int
    corners: tuple[str, ...]


BENCHES = {"main": Bench(HERE / "space.toml", HERE / "configs.json", 256, CORNERS),
           "heldout": Bench(HERE / "heldout" / "space.toml", HERE / "heldout" / "configs.json",
                            60, HELDOUT_CORNERS)}


def latin_hypercube(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, dims)`` points in [0, 1): one per stratum of width 1/n in every dimension
    (McKay et al. 1979)."""
    strata = np.stack([rng.permutation(n) for _ in range(dims)], axis=1)
    return (strata + rng.random((n, dims))) / n


def value_at(p: Param, u: float) -> Any:
    """The Optuna value of parameter ``p`` at quantile ``u`` in [0, 1)."""
    if p.kind == "choice":
        return p.encode(p.choices[min(int(u * len(p.choices)), len(p.choices) - 1)])
    lo, hi = (math.log(p.low), math.log(p.high)) if p.log else (p.low, p.high)
    x = lo + u * (hi - lo)
    x = math.exp(x) if p.log else x
    if p.kind == "int":
        return int(min(max(round(x), p.low), p.high))
    return float(x)


def corner_values(p: Param) -> list[Any]:
    """The extremes of a cost dimension: every choice, or the two ends of a range."""
    if p.kind == "choice":
        return [p.encode(c) for c in p.choices]
    return [int(p.low), int(p.high)] if p.kind == "int" else [p.low, p.high]


def draw(space: SearchSpace, n: int, seed: int, corners: tuple[str, ...] = CORNERS
         ) -> tuple[list[dict[str, Any]], str]:
    """Parameter dicts: the hypercube, then the corners of the ``corners`` dimensions; and
    how they were drawn.

    Raises:
        SpaceError: a corner dimension is not a searched parameter of ``space``.
    """
    params = [p for p in space.params if p.searched]
    unknown = sorted(set(corners) - {p.name for p in params})
    if unknown:
        raise SpaceError(f"corners {', '.join(unknown)}: not searched parameters of the space")
    rng = np.random.default_rng(seed)
    grid = latin_hypercube(n, len(params), rng)
    points = [{p.name: value_at(p, u) for p, u in zip(params, row)} for row in grid]
    corner_params = [p for p in params if p.name in corners]
    combos = list(itertools.product(*(corner_values(p) for p in corner_params)))
    filler = latin_hypercube(len(combos), len(params), rng)
    for combo, row in zip(combos, filler):
        point = {p.name: value_at(p, u) for p, u in zip(params, row)}
        point.update({p.name: v for p, v in zip(corner_params, combo)})
        points.append(point)
    how = (f"Latin hypercube of {n} points over the {len(params)} searched parameters "
           f"(seed {seed}) + {len(combos)} corners ({' x '.join(corners)} at their extremes)")
    return points, how


def plan(space_path: Path, n: int, seed: int, corners: tuple[str, ...] = CORNERS
         ) -> dict[str, Any]:
    """The configs.json document for the space file at ``space_path``."""
    text = space_path.read_text()
    space = load_space(space_path)
    points, how = draw(space, n, seed, corners)
    configs: list[dict[str, Any]] = []
    seen, invalid = set(), 0
    for values in points:
        key = json.dumps(values, sort_keys=True)
        try:
            config = space.decode(values)
        except ValueError:
            invalid += 1
            continue
        if key in seen:
            continue
        seen.add(key)
        steps = config.train.steps
        configs.append({"id": len(configs), "params": values, "config": config.to_dict(),
                        "cost": {"params": param_count(config.unet), "flops": flops(config.unet),
                                 "train_steps": steps},
                        "rungs": list(space.rungs.steps(steps))})
    return {"about": "configs planned for the searchbench table (benchmarks/searchbench)",
            "space_file": space_path.name,
            "space_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "params_fingerprint": params_fingerprint(space),
            "method": how, "invalid_dropped": invalid, "duplicates_dropped":
                len(points) - invalid - len(configs),
            "data": vars(space.data), "evaluate": vars(space.evaluate),
            "limits": space.constraints.limits(), "configs": configs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", choices=BENCHES, default="main",
                   help="the benchmark whose defaults the options below take")
    p.add_argument("--n", type=int, help="points of the Latin hypercube")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--corners", nargs="+", help="the searched parameters whose extremes "
                   "are combined into corners")
    args = p.parse_args(argv)
    bench = BENCHES[args.bench]
    n = bench.n if args.n is None else args.n
    space, out = args.space or bench.space, args.out or bench.out
    corners = tuple(args.corners) if args.corners else bench.corners
    if n < 1:
        p.error(f"--n {n}: must be >= 1")
    try:
        doc = plan(space, n, args.seed, corners)
    except (OSError, SpaceError) as err:
        print(f"plan: {space}: {err}", file=sys.stderr)
        return 2
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(doc['configs'])} configs -> {out} ({doc['method']}; "
          f"{doc['invalid_dropped']} invalid, {doc['duplicates_dropped']} duplicates dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
