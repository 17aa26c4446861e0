#!/usr/bin/env python3
"""What moves a small model's sampling latency on a GPU between measurements seconds apart,
and which correction holds it still (issue 16, part 4: the H200 latency predictor).

  python3 benchmarks/gpu/latency_stability.py [--configs 4] [--rounds 10] [--gap-s 0.5]
      [--warm-s 0.5] [--smi FILE] [--json OUT.json]

On an idle H200 a 16 px config's latency moved 1.8-2.1x between rounds while the 10 runs
inside one measurement agreed to 1-10% (``benchmarks/latency_predictor.md``). Each round
here measures every config (``benchmarks/latency_predictor.py``'s generator and seed) in a
shuffled order, twice, in two modes:

- ``cold``: after ``--gap-s`` of sleep (as between a trial's phases), one warm-up call, then
  the median of 10 runs;
- ``warm``: the call run back to back for ``--warm-s`` first, then the same;
- ``pinned``: as ``warm``, with every thread of the process held on the main thread's core
  while timing (``engine.device.contention.held_still``, as the steady protocol times). A
  CUDA backend has threads of its own (the driver's callbacks), which then share that core.

Beside every measurement it times two references right before it: ``conv`` (the steady
protocol's reference workload, ``engine.device.steady.reference_workload``) and ``launch``
(100 small element-wise ops, evaluated one by one: the cost of launching a kernel and
waiting for it), and records the clock of the core it ran on (``/proc/cpuinfo``); with ``--smi`` (an
``nvidia-smi --query-gpu=timestamp,clocks.sm --format=csv,noheader -lms 100`` log running
meanwhile) it counts the GPU's SM clocks seen. Per mode it reports the share of
rounds within +-10% of the config's median: raw, and divided by each reference (what a
protocol that scales by that reference would record).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/

import engine  # noqa: F401, I001  (binds OpenBLAS before mlx loads)
import mlx.core as mx
import numpy as np
from latency_predictor import describe, random_config

from engine.device.bench import device_fingerprint, time_call
from engine.device.contention import current_core, held_still
from engine.device.steady import reference_workload, window_ms
from engine.model.unet import UNet
from engine.sampling.samplers import generate

MODES = ("cold", "warm", "pinned")
REFS = ("conv", "launch")


_SMALL = mx.ones((1, 16, 16, 32))


def launch_reference() -> None:
    y = _SMALL
    for _ in range(100):
        y = y * 1.0001
        mx.eval(y)


def core_mhz(core: int | None) -> float | None:
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return None
    for b in blocks:
        fields = dict(line.split(":", 1) for line in b.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if fields.get("processor") == str(core) and "cpu MHz" in fields:
            return float(fields["cpu MHz"])
    return None


def smi_clocks(path: Path | None) -> dict[str, int]:
    """How often each SM clock (MHz) appears in an ``nvidia-smi -lms`` log
    (``timestamp,clocks.sm,...``) that ran through the measurements."""
    seen: dict[str, int] = {}
    if path is None or not path.exists():
        return seen
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) > 1 and parts[1].endswith("MHz"):
            seen[parts[1]] = seen.get(parts[1], 0) + 1
    return seen


def probe_ms(fn) -> float:
    """The faster of two medians of 3 runs (a reference, timed beside a measurement)."""
    return min(float(np.median([_once_ms(fn) for _ in range(3)])) for _ in range(2))


def _once_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--gap-s", type=float, default=0.5)
    ap.add_argument("--warm-s", type=float, default=0.5)
    ap.add_argument("--smi", type=Path, help="an nvidia-smi -lms log (timestamp,clocks.sm,...)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    configs = [random_config(rng, args.image_size) for _ in range(args.configs)]
    models = [UNet(c.unet) for c in configs]
    calls = [(lambda m=m, c=c: mx.eval(generate(m, c.schedule, 1, 0, c.unet.image_size,
                                                   c.unet.channels)))
             for m, c in zip(models, configs)]
    for fn in calls:
        fn()
    refs = {"conv": reference_workload(), "launch": launch_reference}
    for r in refs.values():
        r()
    order = np.random.default_rng(args.seed + 1)
    rows = []
    start = time.time()
    for rnd in range(args.rounds):
        for i in order.permutation(len(configs)):
            for mode in MODES:
                if mode == "cold":
                    time.sleep(args.gap_s)
                    calls[i]()
                else:
                    window_ms(calls[i], min_ms=args.warm_s * 1e3)
                ref_ms = {name: probe_ms(r) for name, r in refs.items()}
                at = time.time()
                with held_still(mode == "pinned"):
                    ms = time_call(calls[i], runs=10, warmup=0, retries=0).median_ms
                    core = current_core()
                rows.append({"round": rnd, "config": int(i), "mode": mode, "ms": ms,
                             **{f"{k}_ms": v for k, v in ref_ms.items()},
                             "at": at, "core": core, "cpu_mhz": core_mhz(core)})
        print(f"round {rnd + 1}/{args.rounds}: " + " ".join(
            f"{r['ms']:.1f}" for r in rows if r["round"] == rnd), flush=True)
    summary = summarise(rows, configs)
    summary.update(device=device_fingerprint(), seconds=time.time() - start,
                   gpu_sm_clocks=smi_clocks(args.smi),
                   gap_s=args.gap_s, warm_s=args.warm_s)
    print(json.dumps({k: v for k, v in summary.items() if k != "device"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


def within(values: np.ndarray, tol: float = 0.10) -> float:
    return float(np.mean(np.abs(values / np.median(values) - 1) <= tol))


def summarise(rows: list[dict], configs: list) -> dict:
    out: dict = {"configs": [describe(c) for c in configs]}
    columns = {**{k: f"{k}_ms" for k in REFS}, "cpu_mhz": "cpu_mhz"}
    for mode in MODES:
        per: dict[str, list[float]] = {"raw": [], **{f"over_{k}": [] for k in REFS}}
        corr: dict[str, list[float]] = {k: [] for k in columns}
        spans = []
        for i in range(len(configs)):
            group = [r for r in rows if r["mode"] == mode and r["config"] == i]
            ms = np.array([r["ms"] for r in group])
            spans.append(ms.max() / ms.min())
            per["raw"].append(within(ms))
            for k in REFS:
                per[f"over_{k}"].append(within(ms / np.array([r[f"{k}_ms"] for r in group])))
            for k, column in columns.items():
                col = [r[column] for r in group]
                if None not in col and np.std(col) > 0 and np.std(ms) > 0:
                    corr[k].append(float(np.corrcoef(ms, col)[0, 1]))
        out[mode] = {"within_10": {k: float(np.mean(v)) for k, v in per.items()},
                     "median_corr_with_latency": {k: float(np.median(v)) if v else None
                                                  for k, v in corr.items()},
                     "max_over_min": float(np.median(spans))}
    return out


if __name__ == "__main__":
    sys.exit(main())
