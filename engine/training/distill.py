"""Fewer sampling steps: progressive distillation with quality gates and rollback.

Progressive distillation (Salimans & Ho 2022, Alg. 2) halves a DDIM sampler's step
count per stage, 64 -> 32 -> ... -> 4: the student, initialised from its teacher, learns
to match two teacher DDIM steps with one of its own. Consistency distillation (Song et
al. 2023) lives in :mod:`engine.training.consistency` and shares the gate below.

Every stage is gated. Its student is scored by an injectable quality function (FID for
real use, a cheap proxy in tests); a stage whose score exceeds ``max_fid_ratio`` times
the baseline is retried with more training steps and a lower learning rate, and a stage
that still fails rolls the result back to the last stage that passed. Every attempt
keeps its checkpoint (``stage<i>-<k>steps-a<attempt>/``) and a :class:`StageRecord`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config, ScheduleConfig, TrainConfig
from engine.data.datasets import Dataset
from engine.sampling.diffusion import alpha_sigma_mx, to_x0_eps
from engine.io.checkpoint import CheckpointError, load_weights, save_checkpoint
from engine.sampling.samplers import generate
from engine.sampling.schedules import T_MIN, alpha_sigma, times
from engine.training.train import TrainState
from engine.model.unet import UNet

__all__ = [
    "DistillResult",
    "Gate",
    "ProgressiveConfig",
    "QualityFn",
    "StageRecord",
    "distill",
    "fid_quality",
    "load_distilled",
    "progressive_distill",
    "progressive_loss",
    "reparametrise",
    "sample_error_quality",
]

METHODS = ("progressive", "consistency")
WEIGHTS = ("truncated_snr", "snr_plus_one")
SPACINGS = ("trailing", "uniform", "quadratic", "karras")
BASELINES = ("previous", "teacher")

Quality = float | Mapping[str, float]
QualityFn = Callable[[nn.Module, ScheduleConfig], Quality]
"""``quality(model, schedule) -> fid`` (lower is better), or a mapping with ``fid`` and ``kid``."""
Emit = Callable[[str], None]


def _check(cond: bool, owner: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{owner}.{name}={value!r}: {why}")


@dataclass(frozen=True)
class Gate:
    """Pass a stage when its FID is finite and at most ``max_fid_ratio`` x the baseline.

    The baseline is the previous passing stage (``previous``; the teacher at its N steps
    for the first stage) or always the teacher (``teacher``). A failing stage is retried
    ``max_retries`` times, attempt ``a`` with ``retry_steps_factor**a`` times the training
    steps and ``retry_lr_factor**a`` times the learning rate.
    """

    max_fid_ratio: float = 1.10
    max_retries: int = 2
    retry_steps_factor: float = 2.0
    retry_lr_factor: float = 0.5
    baseline: str = "previous"

    def __post_init__(self) -> None:
        o = "Gate"
        _check(self.max_fid_ratio > 0, o, "max_fid_ratio", self.max_fid_ratio, "must be > 0")
        _check(self.max_retries >= 0, o, "max_retries", self.max_retries, "must be >= 0")
        _check(self.retry_steps_factor >= 1.0, o, "retry_steps_factor", self.retry_steps_factor,
               "must be >= 1")
        _check(0.0 < self.retry_lr_factor <= 1.0, o, "retry_lr_factor", self.retry_lr_factor,
               "must be in (0, 1]")
        _check(self.baseline in BASELINES, o, "baseline", self.baseline,
               f"must be one of {', '.join(BASELINES)}")

    def attempts(self, train_steps: int, learning_rate: float) -> list[tuple[int, float]]:
        """``(train_steps, learning_rate)`` of the first try and of every retry."""
        return [(max(1, round(train_steps * self.retry_steps_factor**a)),
                 learning_rate * self.retry_lr_factor**a) for a in range(self.max_retries + 1)]

    def passes(self, fid: float, baseline_fid: float) -> bool:
        return math.isfinite(fid) and fid <= self.max_fid_ratio * baseline_fid


@dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive distillation from ``teacher_steps`` down to ``target_steps`` (powers of 2 apart).

    ``weight`` is the paper's x-space loss weight: ``truncated_snr`` = max(SNR, 1) or
    ``snr_plus_one`` = SNR + 1 (Salimans & Ho 2022, Sec. 4). ``stage_learning_rates[i]``
    and ``stage_train_steps[i]`` override ``learning_rate`` and ``train_steps`` for stage
    ``i + 1`` (early stages, where two steps are nearly one, need less training). An eps-prediction teacher is first
    converted to v-prediction in ``reparam_steps`` (eps is unstable at few steps, Sec. 4).
    """

    teacher_steps: int = 64
    target_steps: int = 4
    train_steps: int = 500
    batch_size: int = 64
    learning_rate: float = 2e-4
    stage_learning_rates: tuple[float, ...] = ()
    stage_train_steps: tuple[int, ...] = ()
    weight: str = "truncated_snr"
    spacing: str = "trailing"
    reparam_steps: int = 300
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        o = "ProgressiveConfig"
        object.__setattr__(self, "stage_learning_rates",
                           tuple(float(v) for v in self.stage_learning_rates))
        object.__setattr__(self, "stage_train_steps", tuple(int(v) for v in self.stage_train_steps))
        _check(1 <= self.target_steps < self.teacher_steps <= 4096, o, "target_steps",
               self.target_steps, f"must be in [1, teacher_steps={self.teacher_steps})")
        ratio = self.teacher_steps // self.target_steps
        _check(self.teacher_steps % self.target_steps == 0 and ratio & (ratio - 1) == 0, o,
               "teacher_steps", self.teacher_steps,
               f"must be target_steps={self.target_steps} times a power of 2")
        _check(self.train_steps >= 1, o, "train_steps", self.train_steps, "must be >= 1")
        _check(self.batch_size >= 1, o, "batch_size", self.batch_size, "must be >= 1")
        _check(self.learning_rate > 0, o, "learning_rate", self.learning_rate, "must be > 0")
        _check(all(v > 0 for v in self.stage_learning_rates), o, "stage_learning_rates",
               self.stage_learning_rates, "must all be > 0")
        _check(all(v >= 1 for v in self.stage_train_steps), o, "stage_train_steps",
               self.stage_train_steps, "must all be >= 1")
        _check(self.weight in WEIGHTS, o, "weight", self.weight, f"must be one of {WEIGHTS}")
        _check(self.spacing in SPACINGS, o, "spacing", self.spacing, f"must be one of {SPACINGS}")
        _check(self.reparam_steps >= 0, o, "reparam_steps", self.reparam_steps, "must be >= 0")
        _check(self.grad_clip >= 0, o, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")

    @property
    def stage_steps(self) -> tuple[int, ...]:
        """Student step counts, one per stage: N/2, N/4, ..., target."""
        out, k = [], self.teacher_steps
        while k > self.target_steps:
            k //= 2
            out.append(k)
        return tuple(out)

    def plan(self, stage: int) -> tuple[int, float]:
        """``(train_steps, learning_rate)`` of stage ``stage`` (1-based)."""
        steps, lrs = self.stage_train_steps, self.stage_learning_rates
        return (steps[stage - 1] if stage <= len(steps) else self.train_steps,
                lrs[stage - 1] if stage <= len(lrs) else self.learning_rate)


@dataclass(frozen=True)
class StageRecord:
    """One attempt at one stage; stage 0 is the teacher at its N steps."""

    stage: int
    steps: int
    attempt: int
    fid: float
    kid: float
    latency_ms: float
    passed: bool
    train_steps: int
    learning_rate: float
    baseline_fid: float
    final_loss: float
    checkpoint: str


@dataclass(frozen=True)
class DistillResult:
    """The model of the last passing stage, how to sample it, and every attempt's record.

    ``model`` is what samples (a U-Net, or its consistency wrapper): draw images with
    ``engine.sampling.samplers.generate(result.model, result.schedule, ...)``.
    """

    method: str
    model: nn.Module
    schedule: ScheduleConfig
    state: TrainState
    checkpoint: Path
    final_stage: int
    stages: tuple[StageRecord, ...]

    @property
    def final(self) -> StageRecord:
        return next(r for r in self.stages if r.stage == self.final_stage and r.passed)

    @property
    def rolled_back(self) -> bool:
        return self.final_stage < max(r.stage for r in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "schedule": asdict(self.schedule),
                "checkpoint": str(self.checkpoint), "final_stage": self.final_stage,
                "rolled_back": self.rolled_back, "stages": [asdict(r) for r in self.stages]}

    def table(self) -> str:
        """The stage table as Markdown."""
        rows = ["| stage | steps | attempt | FID | KID | latency ms | gate | train steps | lr |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.stages:
            rows.append(f"| {r.stage} | {r.steps} | {r.attempt} | {r.fid:.4g} | {r.kid:.4g} | "
                        f"{r.latency_ms:.1f} | {'pass' if r.passed else 'FAIL'} | "
                        f"{r.train_steps} | {r.learning_rate:.2g} |")
        return "\n".join(rows)


# --- paper math ---------------------------------------------------------------------------

def _expand(a: mx.array) -> mx.array:
    return a[:, None, None, None]


def _snr_weight(alpha: mx.array, sigma: mx.array, weight: str) -> mx.array:
    """x-space loss weight: max(SNR, 1) or SNR + 1 (Salimans & Ho 2022, Sec. 4)."""
    snr = alpha**2 / sigma**2
    return mx.maximum(snr, 1.0) if weight == "truncated_snr" else snr + 1.0


def _teacher_x0_eps(model: nn.Module, prediction: str, z: mx.array, t: mx.array,
                    alpha: mx.array, sigma: mx.array) -> tuple[mx.array, mx.array]:
    """Batched ``denoise``: x0 clipped to [-1, 1] and eps made consistent, as DDIM samples."""
    x0, _ = to_x0_eps(model(z, t), z, alpha, sigma, prediction)
    x0 = mx.clip(x0, -1.0, 1.0)
    return x0, (z - alpha * x0) / sigma


def ddim_step(model: nn.Module, prediction: str, z: mx.array, t: mx.array, a: mx.array,
               s: mx.array, a_next: mx.array, s_next: mx.array) -> mx.array:
    """One deterministic DDIM step from t to the next time (Song et al. 2021, eq. 12)."""
    x0, eps = _teacher_x0_eps(model, prediction, z, t, a, s)
    return a_next * x0 + s_next * eps


def progressive_loss(student: nn.Module, teacher: nn.Module, x0: mx.array, key: mx.array,
                     grid: tuple[mx.array, mx.array, mx.array], student_prediction: str,
                     teacher_prediction: str, weight: str) -> mx.array:
    """Salimans & Ho 2022, Alg. 2: one student DDIM step matches two teacher DDIM steps.

    Args:
        x0: data batch (B, H, W, C).
        grid: the teacher's ``(t, alpha, sigma)``, each (2K + 1,), descending to t = 0;
            the student steps from ``t[2i]`` to ``t[2i + 2]``, the teacher via ``t[2i + 1]``.
    """
    gt, ga, gs = grid
    k_i, k_eps = mx.random.split(key)
    i = 2 * mx.random.randint(0, (gt.shape[0] - 1) // 2, (x0.shape[0],), key=k_i)
    t, t1 = gt[i], gt[i + 1]
    (a, a1, a2), (s, s1, s2) = ([_expand(g[j]) for j in (i, i + 1, i + 2)] for g in (ga, gs))
    z = a * x0 + s * mx.random.normal(x0.shape, key=k_eps)
    z1 = ddim_step(teacher, teacher_prediction, z, t, a, s, a1, s1)
    z2 = ddim_step(teacher, teacher_prediction, z1, t1, a1, s1, a2, s2)
    x_target = mx.stop_gradient((z2 - (s2 / s) * z) / (a2 - (s2 / s) * a))
    x_hat, _ = to_x0_eps(student(z, t), z, a, s, student_prediction)
    per_image = mx.mean((x_target - x_hat) ** 2, axis=(1, 2, 3))
    return mx.mean(_snr_weight(a, s, weight).reshape(-1) * per_image)


def _reparam_loss(student: nn.Module, teacher: nn.Module, x0: mx.array, key: mx.array,
                  student_prediction: str, teacher_prediction: str, kind: str,
                  weight: str) -> mx.array:
    """Regress the student's x0 on the teacher's (clipped) x0 at uniform times."""
    k_t, k_eps = mx.random.split(key)
    t = mx.random.uniform(T_MIN, 1.0, (x0.shape[0],), key=k_t)
    a, s = (_expand(v) for v in alpha_sigma_mx(t, kind))
    z = a * x0 + s * mx.random.normal(x0.shape, key=k_eps)
    x_target = mx.stop_gradient(_teacher_x0_eps(teacher, teacher_prediction, z, t, a, s)[0])
    x_hat, _ = to_x0_eps(student(z, t), z, a, s, student_prediction)
    per_image = mx.mean((x_target - x_hat) ** 2, axis=(1, 2, 3))
    return mx.mean(_snr_weight(a, s, weight).reshape(-1) * per_image)


# --- training -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FitPlan:
    """One training run: steps, learning rate (annealed linearly to 0 when ``decay``), batch."""

    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    grad_clip: float
    decay: bool = True


def _batch(images: np.ndarray, seed: int, step: int, size: int) -> mx.array:
    rng = np.random.default_rng([seed, 7, step])
    return mx.array(images[rng.integers(0, len(images), size)])


def fit(model: nn.Module, loss: Callable[[mx.array, mx.array], mx.array], images: np.ndarray,
        run: FitPlan, frozen: Sequence[Any] = (), after_step: Callable[[], Any] | None = None,
        ) -> tuple[optim.Optimizer, list[float]]:
    """Minimise ``loss(x0, key)`` over ``model`` with one compiled AdamW update per step.

    ``frozen`` lists read-only state the loss reads (teacher, target network);
    ``after_step`` returns arrays to evaluate with the step (an EMA update). Stops at
    the first non-finite loss, which is then the last entry of the returned losses.
    """
    lr = optim.linear_schedule(run.learning_rate, 0.0, run.steps) if run.decay else run.learning_rate
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.0)
    opt.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state + list(frozen), outputs=state)
    def step(x0: mx.array, key: mx.array) -> mx.array:
        value, grads = loss_and_grad(x0, key)
        if run.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, run.grad_clip)
        opt.update(model, grads)
        return value

    losses: list[float] = []
    for n in range(run.steps):
        value = step(_batch(images, run.seed, n, run.batch_size),
                     mx.random.key((run.seed * 1_000_003 + n) % 2**63))
        extra = after_step() if after_step is not None else None
        mx.eval(value, model.state, opt.state, extra)
        losses.append(float(np.array(value)))
        if not math.isfinite(losses[-1]):
            break
    return opt, losses


def copy_model(model: UNet) -> UNet:
    """A new U-Net with the same weights (MLX arrays are immutable, so sharing is safe)."""
    out = UNet(model.config)
    out.update(tree_map(lambda p: p, model.parameters()))
    return out


def student_prediction(teacher_prediction: str) -> str:
    """eps is unstable at few steps (alpha -> 0 at t = 1); v and x0 are kept as they are."""
    return "v" if teacher_prediction == "eps" else teacher_prediction


def reparametrise(teacher: UNet, config: Config, images: np.ndarray, steps: int,
                  learning_rate: float, batch_size: int = 64, seed: int = 0,
                  weight: str = "truncated_snr") -> UNet:
    """A copy of ``teacher`` predicting v instead of eps, trained to match its x0.

    Returns ``teacher`` itself when its prediction needs no change.
    """
    prediction = config.schedule.prediction
    if student_prediction(prediction) == prediction or steps == 0:
        return teacher
    student = copy_model(teacher)
    teacher.eval()
    loss = partial(_reparam_loss, student, teacher, student_prediction=student_prediction(prediction),
                   teacher_prediction=prediction, kind=config.schedule.beta_schedule, weight=weight)
    fit(student, loss, images, FitPlan(steps, learning_rate, batch_size, seed, 1.0),
        frozen=[teacher.state])
    return student


def student_state(model: UNet, config: Config, schedule: ScheduleConfig, run: FitPlan,
                  optimizer: optim.Optimizer, ema: dict | None = None,
                  ema_decay: float = 0.0) -> TrainState:
    """A :class:`TrainState` for a distilled model, so ``engine.io.checkpoint`` can checkpoint it."""
    train = TrainConfig(steps=max(run.steps, 1), batch_size=run.batch_size,
                        learning_rate=run.learning_rate, warmup_steps=0, ema_decay=ema_decay,
                        grad_clip=run.grad_clip, seed=run.seed, eval_every=max(run.steps, 1))
    ema = ema if ema is not None else tree_map(lambda p: p, model.parameters())
    return TrainState(replace(config, schedule=schedule, train=train), model, ema, optimizer,
                      step=run.steps)


# --- schedules ----------------------------------------------------------------------------

def base_schedule(config: Config, steps: int, spacing: str = "trailing") -> ScheduleConfig:
    """The teacher's deterministic DDIM sampler at ``steps`` on ``spacing``."""
    return replace(config.schedule, sampler="ddim", steps=steps, eta=0.0, spacing=spacing,
                   timesteps=())


def sub_schedule(base: ScheduleConfig, steps: int, prediction: str) -> ScheduleConfig:
    """Every ``base.steps // steps``-th time of ``base``, named by its spacing if it matches."""
    every = base.steps // steps
    ts = np.concatenate([times(base), [0.0]])[::every][:-1]
    named = replace(base, steps=steps, prediction=prediction)
    if np.allclose(times(named), ts, rtol=0, atol=1e-9):
        return named
    return replace(named, spacing="explicit", timesteps=tuple(float(t) for t in ts))


def grid_arrays(ts: np.ndarray, kind: str) -> tuple[mx.array, mx.array, mx.array]:
    """``(t, alpha, sigma)`` at times ``ts``, computed in float64 so that sigma(0) is exactly 0."""
    alpha, sigma = alpha_sigma(np.asarray(ts, dtype=np.float64), kind)
    return tuple(mx.array(np.asarray(v, dtype=np.float32)) for v in (ts, alpha, sigma))  # type: ignore


def schedule_grid(schedule: ScheduleConfig) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`grid_arrays` of a schedule's sampling grid, ending at t = 0."""
    return grid_arrays(np.concatenate([times(schedule), [0.0]]), schedule.beta_schedule)


# --- quality ------------------------------------------------------------------------------

def _sample(model: nn.Module, schedule: ScheduleConfig, n: int, seed: int, size: int,
            channels: int, batch: int = 250) -> np.ndarray:
    return np.concatenate([np.array(generate(model, schedule, min(batch, n - i), seed + i, size,
                                             channels)) for i in range(0, n, batch)])


def fid_quality(dataset: Dataset, n: int = 1000, seed: int = 0,
                cache_dir: Path | None = None) -> QualityFn:
    """FID and KID of ``n`` samples (at most half the dataset) on its feature network."""
    from engine.quality.features import feature_network_for
    from engine.quality.metrics import evaluate_quality

    n = min(n, len(dataset) // 2)  # the real-vs-real floor needs two disjoint real sets of n
    net = feature_network_for(dataset, cache_dir or Path("results") / "feature-nets")

    def quality(model: nn.Module, schedule: ScheduleConfig) -> dict[str, float]:
        fake = _sample(model, schedule, n, seed, dataset.image_size, dataset.channels)
        if not np.isfinite(fake).all():
            return {"fid": math.inf, "kid": math.inf}  # a diverged student fails its gate
        record = evaluate_quality(fake, dataset.images, net, n, seed)
        return {"fid": float(record.fid), "kid": float(record.kid)}

    return quality


def sample_error_quality(reference: np.ndarray, seed: int) -> QualityFn:
    """A cheap stand-in for FID: mean squared error to ``reference`` from the same noise.

    ``reference`` is ``generate(teacher, fine_schedule, n, seed, ...)``, e.g. the teacher's
    DDIM at 2N steps; every model is sampled from that same noise (seed).
    """
    n, size, _, channels = reference.shape

    def quality(model: nn.Module, schedule: ScheduleConfig) -> float:
        fake = _sample(model, schedule, n, seed, size, channels)
        return float(np.mean((fake - reference) ** 2))

    return quality


def _as_metrics(value: Quality) -> tuple[float, float]:
    if isinstance(value, Mapping):
        return float(value["fid"]), float(value.get("kid", math.nan))
    return float(value), math.nan


# --- the gated stage loop -----------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A passing stage: its state, the model that samples, how to sample it, its score."""

    stage: int
    state: TrainState
    model: nn.Module
    schedule: ScheduleConfig
    fid: float
    checkpoint: Path


@dataclass(frozen=True)
class StagePlan:
    """One stage: its student's sampling steps and the first attempt's training budget."""

    stage: int
    steps: int
    train_steps: int
    learning_rate: float


@dataclass(frozen=True)
class Trained:
    """What one attempt produced; ``meta`` goes to ``distill.json`` beside the checkpoint."""

    state: TrainState
    model: nn.Module
    schedule: ScheduleConfig
    losses: list[float]
    meta: Mapping[str, Any] = field(default_factory=dict)


Attempt = Callable[[Snapshot, StagePlan, int, float], Trained]
"""``attempt(previous passing snapshot, plan, train_steps, learning_rate) -> Trained``."""


class Scorer:
    """Quality plus batch-1 sampling latency (cached per schedule: weights do not matter)."""

    def __init__(self, quality: QualityFn, config: Config, measure_latency: bool):
        self.quality, self.config, self.measure = quality, config, measure_latency
        self._latency: dict[str, float] = {}

    def __call__(self, model: nn.Module, schedule: ScheduleConfig) -> tuple[float, float, float]:
        fid, kid = _as_metrics(self.quality(model, schedule))
        return fid, kid, self.latency(model, schedule)

    def latency(self, model: nn.Module, schedule: ScheduleConfig) -> float:
        if not self.measure:
            return math.nan
        key = json.dumps(asdict(schedule), sort_keys=True)
        if key not in self._latency:
            from engine.device.bench import sampling_latency

            stat = sampling_latency(model, replace(self.config, schedule=schedule),  # type: ignore[arg-type]
                                    batch=1)  # any (x_t, t) -> prediction module samples
            self._latency[key] = stat.median_ms
        return self._latency[key]


def _save(state: TrainState, folder: Path, method: str, schedule: ScheduleConfig,
          meta: Mapping[str, Any]) -> Path:
    save_checkpoint(state, folder)
    info = {"method": method, "schedule": asdict(schedule), **meta}
    (folder / "distill.json").write_text(json.dumps(info, indent=2))
    return folder


def teacher_snapshot(teacher: UNet, config: Config, schedule: ScheduleConfig, score: Scorer,
                     out: Path, method: str, emit: Emit) -> tuple[Snapshot, StageRecord]:
    """Stage 0: score the teacher at its N steps and checkpoint it (the last-resort rollback)."""
    teacher.eval()
    opt = optim.AdamW(learning_rate=config.train.learning_rate)
    opt.init(teacher.trainable_parameters())
    state = TrainState(replace(config, schedule=schedule), teacher,
                       tree_map(lambda p: p, teacher.parameters()), opt)
    folder = _save(state, out / f"stage0-{schedule.steps}steps-teacher", method, schedule, {})
    fid, kid, latency = score(teacher, schedule)
    emit(f"stage 0: teacher at {schedule.steps} steps: FID {fid:.4g}  latency {latency:.1f} ms")
    record = StageRecord(0, schedule.steps, 0, fid, kid, latency, True, 0, 0.0, math.nan,
                         math.nan, str(folder))
    return Snapshot(0, state, teacher, schedule, fid, folder), record


def run_stages(start: Snapshot, plans: Sequence[StagePlan], attempt: Attempt, gate: Gate,
               score: Scorer, out: Path, method: str,
               emit: Emit) -> tuple[Snapshot, list[StageRecord]]:
    """Run ``plans`` in order, each gated with retries; stop at the first stage that fails.

    Returns:
        The last passing snapshot (``start`` if none passed) and every attempt's record.
    """
    passing, records = start, []
    for plan in plans:
        baseline = start.fid if gate.baseline == "teacher" else passing.fid
        for a, (steps, lr) in enumerate(gate.attempts(plan.train_steps, plan.learning_rate)):
            trained = attempt(passing, plan, steps, lr)
            folder = _save(trained.state, out / f"stage{plan.stage}-{plan.steps}steps-a{a}",
                           method, trained.schedule, trained.meta)
            record = _judge(trained, plan, a, baseline, gate, score, folder)
            records.append(record)
            emit(f"stage {plan.stage}: {plan.steps} steps, attempt {a} ({steps} train steps, "
                 f"lr {lr:.2g}): loss {record.final_loss:.4g}  FID {record.fid:.4g} vs gate "
                 f"{gate.max_fid_ratio * baseline:.4g}: {'pass' if record.passed else 'FAIL'}")
            if record.passed:
                passing = Snapshot(plan.stage, trained.state, trained.model, trained.schedule,
                                   record.fid, folder)
                break
        else:
            emit(f"stage {plan.stage} failed its gate {gate.max_retries + 1} times: rolling back "
                 f"to stage {passing.stage} ({passing.schedule.steps} steps) and stopping")
            break
    return passing, records


def _judge(trained: Trained, plan: StagePlan, attempt: int, baseline: float, gate: Gate,
           score: Scorer, folder: Path) -> StageRecord:
    """Score one attempt (a diverged one scores infinity unseen) and apply the gate."""
    run = trained.state.config.train
    loss = float(np.mean(trained.losses[-max(1, len(trained.losses) // 10):]))
    fid, kid, latency = math.inf, math.nan, math.nan
    if math.isfinite(loss):
        fid, kid, latency = score(trained.model, trained.schedule)
    return StageRecord(plan.stage, plan.steps, attempt, fid, kid, latency,
                       gate.passes(fid, baseline), trained.state.step, run.learning_rate,
                       baseline, loss, str(folder))


def result_of(method: str, final: Snapshot, records: list[StageRecord]) -> DistillResult:
    return DistillResult(method, final.model, final.schedule, final.state, final.checkpoint,
                         final.stage, tuple(records))


# --- progressive distillation -------------------------------------------------------------

def progressive_distill(teacher: UNet, config: Config, images: np.ndarray, out: str | Path,
                        quality: QualityFn, settings: ProgressiveConfig = ProgressiveConfig(),
                        gate: Gate | None = None, measure_latency: bool = True,
                        emit: Emit = print) -> DistillResult:
    """Distil ``teacher`` from ``settings.teacher_steps`` to ``settings.target_steps`` DDIM steps.

    Args:
        teacher: the trained U-Net (EMA weights); never modified.
        config: its config (architecture; ``schedule`` gives prediction and beta schedule).
        images: training images (N, H, W, C) float32 in [-1, 1].
        out: folder for the stage checkpoints.
        quality: scores a model at a schedule, lower is better (see :func:`fid_quality`).

    Returns:
        The last passing stage's student; the teacher itself if the first stage fails.
    """
    out, gate = Path(out), gate or Gate()
    base = base_schedule(config, settings.teacher_steps, settings.spacing)
    score = Scorer(quality, config, measure_latency)
    start, record0 = teacher_snapshot(teacher, config, base, score, out, "progressive", emit)
    prediction = student_prediction(config.schedule.prediction)
    first = reparametrise(teacher, config, images, settings.reparam_steps, settings.learning_rate,
                          settings.batch_size, settings.seed, settings.weight)

    def attempt(prev: Snapshot, plan: StagePlan, steps: int, lr: float) -> Trained:
        init = first if plan.stage == 1 else prev.state.model
        student, schedule = copy_model(init), sub_schedule(base, plan.steps, prediction)
        prev.model.eval()
        loss = partial(progressive_loss, student, prev.model, grid=schedule_grid(prev.schedule),
                       student_prediction=prediction,
                       teacher_prediction=prev.schedule.prediction, weight=settings.weight)
        run = FitPlan(steps, lr, settings.batch_size, settings.seed + plan.stage, settings.grad_clip)
        opt, losses = fit(student, loss, images, run, frozen=[prev.model.state])
        student.eval()
        return Trained(student_state(student, config, schedule, run, opt), student, schedule,
                       losses)

    plans = [StagePlan(i, k, *settings.plan(i)) for i, k in enumerate(settings.stage_steps, 1)]
    final, records = run_stages(start, plans, attempt, gate, score, out, "progressive", emit)
    return result_of("progressive", final, [record0, *records])


# --- entry point for the CLI --------------------------------------------------------------

def distill(checkpoint: str | Path, method: str, steps: int, dataset: Dataset, out: str | Path,
            gate: Gate | None = None, teacher_steps: int = 64, quality: QualityFn | None = None,
            train_steps: int | None = None, batch_size: int | None = None,
            reparam_steps: int | None = None, emit: Emit = print) -> DistillResult:
    """Distil a trained checkpoint to ``steps`` sampling steps; what ``diffnas distill`` calls.

    Writes the stage checkpoints and ``result.json`` (the stage table) under ``out``.
    ``train_steps``, ``batch_size`` and ``reparam_steps`` (the eps -> v conversion of an
    eps-prediction teacher) override the method's defaults when given.

    Raises:
        ValueError: an unknown method, a bad step count, or a dataset that does not match
            the checkpoint's image size or channels.
        engine.io.checkpoint.CheckpointError: the checkpoint is missing, corrupt or mismatched.
    """
    gate = gate or Gate()
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    config, teacher = load_weights(checkpoint)
    u = config.unet
    if (dataset.image_size, dataset.channels) != (u.image_size, u.channels):
        raise ValueError(f"dataset {dataset.name!r} has {dataset.image_size} px x {dataset.channels} "
                         f"channels; the checkpoint expects {u.image_size} px x {u.channels}")
    quality = quality or fid_quality(dataset)
    overrides = {k: v for k, v in (("train_steps", train_steps), ("batch_size", batch_size),
                                   ("reparam_steps", reparam_steps)) if v is not None}
    if method == "progressive":
        settings = ProgressiveConfig(teacher_steps=teacher_steps, target_steps=steps, **overrides)
        result = progressive_distill(teacher, config, dataset.images, out, quality, settings, gate,
                                     emit=emit)
    else:
        from engine.training.consistency import ConsistencyConfig, consistency_distill

        cd = ConsistencyConfig(teacher_steps=teacher_steps, target_steps=steps, **overrides)
        result = consistency_distill(teacher, config, dataset.images, out, quality, cd, gate,
                                     emit=emit)
    (Path(out) / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def load_distilled(folder: str | Path) -> tuple[Config, nn.Module, ScheduleConfig]:
    """A stage checkpoint as ``(config, model that samples, sampling schedule)``.

    Consistency checkpoints come back wrapped in their c_skip/c_out parametrisation.
    """
    folder = Path(folder)
    config, unet = load_weights(folder)
    path = folder / "distill.json"
    if not path.exists():
        return config, unet, config.schedule
    try:
        meta = json.loads(path.read_text())
        schedule = ScheduleConfig(**meta["schedule"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: corrupt distillation record ({err})") from None
    unet.eval()
    if "consistency" not in meta:
        return config, unet, schedule
    from engine.training.consistency import ConsistencyModel

    c = meta["consistency"]
    model = ConsistencyModel(unet, c["prediction"], schedule.beta_schedule, c["sigma_data"], c["eps"])
    return config, model, schedule
