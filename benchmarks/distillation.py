#!/usr/bin/env python3
"""Fewer sampling steps, side by side: teacher DDIM vs progressive vs consistency distillation.

On the built-in digits at 16 px: a teacher trained here, sampled by DDIM at 64/32/16/8/4
steps; its progressive student (Salimans & Ho 2022) at 8/4/2/1 steps; its consistency
model (Song et al. 2023) at 1 and 2 steps. FID and KID on the shipped digit feature
network (with the real-vs-real floor at the same n) and batch-1 sampling latency (warm-up,
median of >= 5 runs) for each, written as Markdown with the device fingerprint::

    uv run python benchmarks/distillation.py                  # ~35 min on 2 shared cores
    uv run python benchmarks/distillation.py --quick          # 8 px smoke run, ~3 min
    uv run python benchmarks/distillation.py --plan gpu --phases teacher   # then progressive, ...

The teacher checkpoint is cached under ``--work`` so that a re-run skips its training.
The Markdown is rewritten after every phase, so a run that is stopped leaves its partial
numbers behind.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import engine  # noqa: F401  (binds OpenBLAS before mlx loads)

# isort: split
from mlx import nn

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig
from engine.data.datasets import Dataset, load_dataset
from engine.device.bench import device_fingerprint, sampling_latency
from engine.io.checkpoint import load_checkpoint, save_checkpoint
from engine.io.models import load_distilled
from engine.quality.features import feature_network_for
from engine.quality.metrics import evaluate_quality
from engine.sampling.samplers import generate
from engine.sampling.substeps import base_schedule
from engine.training.consistency import (
    ConsistencyConfig,
    ConsistencyModel,
    consistency_distill,
    sampling_schedule,
)
from engine.training.progressive import ProgressiveConfig, progressive_distill
from engine.training.stages import DistillResult, Gate
from engine.training.train import init_state, train


@dataclass(frozen=True)
class Plan:
    """Everything that sizes one benchmark run."""

    image_size: int
    unet: UNetConfig
    teacher_train: TrainConfig
    n_eval: int
    teacher_steps: tuple[int, ...]
    progressive: ProgressiveConfig
    progressive_gate: Gate
    consistency: ConsistencyConfig
    consistency_gate: Gate


FULL = Plan(
    image_size=16,
    unet=UNetConfig(image_size=16, base_width=16, width_mults=(1, 2), num_res_blocks=1,
                    norm_groups=4, activation="relu", time_emb_dim=64),
    teacher_train=TrainConfig(steps=2500, batch_size=32, learning_rate=2e-3, warmup_steps=100,
                              ema_decay=0.999, eval_every=250),
    n_eval=500,
    teacher_steps=(64, 32, 16, 8, 4),
    progressive=ProgressiveConfig(teacher_steps=64, target_steps=1, batch_size=32,
                                  learning_rate=3e-4, stage_train_steps=(100, 150, 200, 300, 300,
                                                                         300)),
    progressive_gate=Gate(max_fid_ratio=1.5, max_retries=1, baseline="previous"),
    consistency=ConsistencyConfig(teacher_steps=64, target_steps=1, num_scales=18,
                                  train_steps=600, batch_size=32, learning_rate=2e-4),
    consistency_gate=Gate(max_fid_ratio=4.0, max_retries=0, baseline="teacher"),
)

QUICK = Plan(
    image_size=8,
    unet=UNetConfig(image_size=8, base_width=8, width_mults=(1, 2), norm_groups=4,
                    activation="relu", time_emb_dim=16),
    teacher_train=TrainConfig(steps=200, batch_size=32, learning_rate=3e-3, warmup_steps=20,
                              ema_decay=0.98, eval_every=100),
    n_eval=100,
    teacher_steps=(16, 8, 4),
    progressive=ProgressiveConfig(teacher_steps=16, target_steps=1, train_steps=30, batch_size=16,
                                  learning_rate=5e-4),
    progressive_gate=Gate(max_fid_ratio=1.5, max_retries=1),
    consistency=ConsistencyConfig(teacher_steps=16, target_steps=1, num_scales=12,
                                  train_steps=60, batch_size=16, learning_rate=3e-4),
    consistency_gate=Gate(max_fid_ratio=4.0, max_retries=0, baseline="teacher"),
)


GPU = Plan(
    image_size=16,
    unet=UNetConfig(image_size=16, base_width=32, width_mults=(1, 2, 2), num_res_blocks=2,
                    attn_levels=(2,), head_dim=32, norm_groups=8, activation="silu",
                    time_emb_dim=128),
    teacher_train=TrainConfig(steps=8000, batch_size=128, learning_rate=1e-3, warmup_steps=200,
                              ema_decay=0.9995, eval_every=1000),
    n_eval=1000,
    teacher_steps=(64, 32, 16, 8, 4),
    progressive=ProgressiveConfig(teacher_steps=64, target_steps=1, batch_size=128,
                                  learning_rate=2e-4,
                                  stage_train_steps=(600, 600, 800, 1200, 800, 800)),
    progressive_gate=Gate(max_fid_ratio=1.5, max_retries=1, baseline="previous"),
    consistency=ConsistencyConfig(teacher_steps=64, target_steps=1, num_scales=18,
                                  train_steps=2500, batch_size=128, learning_rate=2e-4),
    consistency_gate=Gate(max_fid_ratio=4.0, max_retries=0, baseline="teacher"),
)
"""A larger teacher trained longer, for a GPU (the H200 run in distillation-gpu.md)."""

PLANS = {"full": FULL, "quick": QUICK, "gpu": GPU}
PHASES = ("teacher", "progressive", "consistency", "latency")


class Scorer:
    """FID/KID of ``n`` samples against the digits; remembers the real-vs-real floor."""

    def __init__(self, dataset: Dataset, n: int, work: Path):
        self.dataset, self.n = dataset, n
        self.net = feature_network_for(dataset, work / "feature-nets")
        self.floor: dict[str, float] = {}

    def __call__(self, model: nn.Module, schedule: ScheduleConfig) -> dict[str, float]:
        size, channels = self.dataset.image_size, self.dataset.channels
        fake = np.concatenate([np.array(generate(model, schedule, min(250, self.n - i), i, size,
                                                 channels)) for i in range(0, self.n, 250)])
        if not np.isfinite(fake).all():
            return {"fid": math.inf, "kid": math.inf}
        record = evaluate_quality(fake, self.dataset.images, self.net, self.n, seed=0)
        self.floor = {"fid": record.fid_floor, "kid": record.kid_floor}
        return {"fid": record.fid, "kid": record.kid}


class Report:
    """Rows of the comparison table plus the stage tables; rewritten to disk on every change."""

    def __init__(self, path: Path, plan_name: str):
        self.path, self.plan_name, self.plan = path, plan_name, PLANS[plan_name]
        self.rows: list[dict[str, Any]] = []
        self.sections: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.floor: dict[str, float] = {}
        self.device = device_fingerprint()

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        self.path.write_text(render(self))
        (self.path.with_suffix(".json")).write_text(json.dumps(
            {"device": self.device, "rows": self.rows, "timings_s": self.timings,
             "floor": self.floor, "sections": self.sections}, indent=2, default=str))

    @classmethod
    def load(cls, path: Path, plan_name: str) -> Report:
        report = cls(path, plan_name)
        saved = json.loads(path.with_suffix(".json").read_text())
        report.rows, report.timings = saved["rows"], saved["timings_s"]
        report.floor, report.sections = saved["floor"], saved.get("sections", {})
        return report


def render(report: Report) -> str:
    p, d = report.plan, report.device
    flag = "" if report.plan_name == "full" else f" --plan {report.plan_name}"
    device = (f"Device: {d['chip']}, backend {d['backend']}, {d['cores']} cores, "
              f"{d['memory_gb']} GB, MLX {d['mlx']}, BLAS: {d['blas']}.")
    data = (f"Data: built-in digits at {p.image_size} px. Teacher: U-Net {p.unet.widths} widths, "
            f"{p.unet.activation}, v-prediction, cosine schedule, {p.teacher_train.steps} steps at "
            f"batch {p.teacher_train.batch_size}; sampled with DDIM (eta 0, trailing spacing).")
    quality = (f"Quality: FID / KID on the shipped digit feature network, n = {p.n_eval} samples "
               f"vs n real; real-vs-real floor at that n: FID {report.floor.get('fid', math.nan):.3f}, "
               f"KID {report.floor.get('kid', math.nan):.4f}. Latency: one image (batch 1), "
               "median of >= 5 runs after warm-up.")
    pd, cd = p.progressive, p.consistency
    pd_steps = pd.stage_train_steps or (pd.train_steps,)
    recipe = (f"Progressive: {pd.teacher_steps} -> {pd.target_steps} steps, training steps per "
              f"stage {pd_steps} at batch {pd.batch_size}, AdamW lr {pd.learning_rate:g} annealed "
              f"to 0, {pd.weight} weight; gate {gate_text(p.progressive_gate)}. Consistency: "
              f"N = {cd.num_scales} Karras times, {cd.train_steps} steps at batch {cd.batch_size}, "
              f"lr {cd.learning_rate:g}, target EMA mu {cd.target_decay}; gate "
              f"{gate_text(p.consistency_gate)}.")
    title = {"full": "", "quick": " (QUICK smoke run)", "gpu": " (GPU plan)"}[report.plan_name]
    lines = [f"# Distillation benchmark{title}", "",
             f"Generated by `uv run python benchmarks/distillation.py{flag}`.", "",
             device, "", data, "", recipe, "", quality, "",
             "| model | steps | FID | KID | latency ms | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report.rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['fid']:.3f} | {r['kid']:.4f} | "
                     f"{r['latency_ms']:.1f} | {r.get('note', '')} |")
    lines += ["", *targets(report), ""]
    for title, text in report.sections.items():
        lines += [f"## {title}", "", text, ""]
    if report.timings:
        lines += ["## Wall time (s)", "", "| phase | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in report.timings.items()]
    return "\n".join(lines) + "\n"


def gate_text(gate: Gate) -> str:
    against = "the teacher" if gate.baseline == "teacher" else "the previous stage"
    return (f"FID <= {gate.max_fid_ratio:g} x {against}, {gate.max_retries} "
            f"retr{'y' if gate.max_retries == 1 else 'ies'}")


def targets(report: Report) -> list[str]:
    fid = {(r["model"], r["steps"]): r["fid"] for r in report.rows}
    top = max(report.plan.teacher_steps)
    teacher, ddim4, pd4 = fid.get(("teacher DDIM", top)), fid.get(("teacher DDIM", 4)), fid.get(
        ("progressive", 4))
    if teacher is None or ddim4 is None or pd4 is None:
        return ["Target check: not reached yet (partial run)."]
    ok = pd4 <= 1.25 * teacher
    line = (f"Target: 4-step progressive FID {pd4:.3f} vs {top}-step teacher {teacher:.3f} "
            f"(ratio {pd4 / teacher:.2f}, target <= 1.25: {'met' if ok else 'NOT met'}); "
            f"DDIM at 4 steps: {ddim4:.3f} ({ddim4 / pd4:.1f}x the student's FID).")
    return [line]


def stage_table(result: DistillResult) -> str:
    return (result.table() + f"\n\nFinal: stage {result.final_stage} "
            f"({result.schedule.steps} steps){', rolled back' if result.rolled_back else ''}.")


def teacher_state(plan: Plan, data: Dataset, work: Path, report: Report):
    folder = work / f"teacher-{plan.image_size}px-{plan.teacher_train.steps}"
    if (folder / "config.json").exists():
        print(f"loading cached teacher {folder}", flush=True)
        return load_checkpoint(folder)
    config = Config(unet=plan.unet, schedule=ScheduleConfig(prediction="v"),
                    train=plan.teacher_train)
    train_set, val_set = data.split(0.1, 0)
    start = time.perf_counter()
    state = train(init_state(config), train_set.images, val_set.images,
                  callback=lambda p: print(f"teacher step {p.step} val {p.val_loss:.4f}",
                                           flush=True))
    report.timings["teacher training"] = time.perf_counter() - start
    save_checkpoint(state, folder)
    return state


def latency(model: nn.Module, config: Config, schedule: ScheduleConfig) -> float:
    return sampling_latency(model, replace(config, schedule=schedule), batch=1).median_ms


def latency_pass(report: Report, teacher: nn.Module, config: Config, rounds: int = 5) -> None:
    """Re-measure every row's latency interleaved, keeping each case's best median.

    Latency depends on architecture, sampler and steps, not on weights, so the teacher's
    U-Net stands in for its students; measuring all cases round-robin and keeping the
    minimum over rounds removes most of the interference of a shared machine.
    """
    cases = {(r["model"], r["steps"]): _latency_case(r["model"], r["steps"], teacher, config,
                                                     report.plan) for r in report.rows}
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for key, (model, schedule) in cases.items():
            best[key] = min(best.get(key, math.inf), latency(model, config, schedule))
    for r in report.rows:
        r["latency_ms"] = best[(r["model"], r["steps"])]
    report.sections["Latency protocol"] = (
        f"Batch 1, warm-up then the median of >= 5 runs (engine.device.bench.sampling_latency), "
        f"all {len(cases)} cases measured round-robin {rounds} times; the best median is "
        "reported. Students share the teacher's architecture, so the teacher's weights stand in.")
    report.write()


def _latency_case(model_name: str, steps: int, teacher: nn.Module, config: Config,
                  plan: Plan) -> tuple[nn.Module, ScheduleConfig]:
    if model_name == "consistency":
        settings = replace(plan.consistency, target_steps=steps)
        return (ConsistencyModel(teacher, "v", config.schedule.beta_schedule),
                sampling_schedule(config, settings))
    return teacher, base_schedule(config, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="full",
                        help="full (16 px, CPU-sized), quick (8 px smoke run), gpu (larger)")
    parser.add_argument("--quick", action="store_true", help="same as --plan quick")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}; later phases "
                        "continue the report an earlier invocation wrote")
    parser.add_argument("--out", type=Path, default=None, help="Markdown output")
    parser.add_argument("--work", type=Path, default=Path("results/bench-distillation"))
    parser.add_argument("--latency-only", action="store_true", help="same as --phases latency")
    args = parser.parse_args()
    name = "quick" if args.quick else args.plan
    phases = ["latency"] if args.latency_only else args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase {min(unknown)!r} (choose from {', '.join(PHASES)})")
    plan = PLANS[name]
    out = args.out or Path("benchmarks") / ("distillation.md" if name == "full"
                                            else f"distillation-{name}.md")
    args.work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(None, image_size=plan.image_size)
    fresh = "teacher" in phases or not out.with_suffix(".json").exists()
    report = Report(out, name) if fresh else Report.load(out, name)
    score = Scorer(data, plan.n_eval, args.work)
    state = teacher_state(plan, data, args.work, report)
    config, teacher = state.config, state.ema_model()
    teacher.eval()
    if "teacher" in phases:
        evaluate_teacher(report, score, teacher, config)
    if "progressive" in phases:
        run_progressive(report, score, teacher, config, data, args.work)
    if "consistency" in phases:
        run_consistency(report, score, teacher, config, data, args.work)
    if "latency" in phases:
        start = time.perf_counter()
        latency_pass(report, teacher, config)
        report.timings["latency pass"] = time.perf_counter() - start
    report.write()
    print(out.read_text())


def evaluate_teacher(report: Report, score: Scorer, teacher: nn.Module, config: Config) -> None:
    start = time.perf_counter()
    for steps in report.plan.teacher_steps:
        schedule = base_schedule(config, steps)
        m = score(teacher, schedule)
        report.floor = score.floor
        report.add(model="teacher DDIM", steps=steps, **m,
                   latency_ms=latency(teacher, config, schedule))
        print(report.rows[-1], flush=True)
    report.timings["teacher evaluation"] = time.perf_counter() - start


def run_progressive(report: Report, score: Scorer, teacher: nn.Module, config: Config,
                    data: Dataset, work: Path) -> None:
    plan, start = report.plan, time.perf_counter()
    pd = progressive_distill(teacher, config, data.images, work / "progressive", score,
                             plan.progressive, plan.progressive_gate)
    report.timings["progressive distillation (incl. gate evaluations)"] = time.perf_counter() - start
    report.sections["Progressive distillation: stage table"] = stage_table(pd)
    for r in pd.stages:
        last_try = r is [s for s in pd.stages if s.stage == r.stage][-1]
        if r.stage > 0 and r.steps <= 8 and (r.passed or last_try):
            note = "gate pass" if r.passed else "gate FAIL (rolled back)"
            report.add(model="progressive", steps=r.steps, fid=r.fid, kid=r.kid,
                       latency_ms=r.latency_ms, note=f"{note}, attempt {r.attempt}")


def run_consistency(report: Report, score: Scorer, teacher: nn.Module, config: Config,
                    data: Dataset, work: Path) -> None:
    plan, start = report.plan, time.perf_counter()
    cd = consistency_distill(teacher, config, data.images, work / "consistency", score,
                             plan.consistency, plan.consistency_gate)
    report.timings["consistency distillation (incl. gate evaluation)"] = time.perf_counter() - start
    report.sections["Consistency distillation: stage table"] = stage_table(cd)
    last = cd.stages[-1]
    report.add(model="consistency", steps=1, fid=last.fid, kid=last.kid,
               latency_ms=last.latency_ms, note="gate pass" if last.passed else "gate FAIL")
    _, model, schedule = load_distilled(last.checkpoint)
    two = replace(schedule, steps=2)
    report.add(model="consistency", steps=2, **score(model, two),
               latency_ms=latency(model, config, two), note="same model, 2-step sampling")


if __name__ == "__main__":
    main()
