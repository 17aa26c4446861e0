"""What fits a memory budget: the largest batch, and what checkpointing and bf16 save.

:func:`format_report` is what ``diffnas memory --config cfg.json [--budget-mb M]`` prints.
Every number is a prediction of :mod:`engine.device.memory.model`; only the time factors
can be measured here (``measure_time``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Config
from engine.device.bench import train_throughput
from engine.device.memory.model import CALIBRATION, MemoryProfile, predict, training_variant


@dataclass(frozen=True)
class Option:
    """A memory-saving training option and what it costs in time."""

    name: str
    train_step_mb: float
    saving_mb: float
    saving: float          # fraction of the plain float32 step peak
    max_batch: int
    time_factor: float     # step time relative to plain float32 (1.3 = 30% slower)
    time_source: str       # "measured" here, or "calibration" (median of the fit configs)


@dataclass(frozen=True)
class Recommendation:
    """What fits in ``budget_mb``; the table rows are (batch, float32, +ckpt, bf16) MB."""

    budget_mb: float
    fits: bool
    reason: str
    batch: int
    max_batch: int
    options: tuple[Option, ...]
    table: tuple[tuple[int, float, float, float], ...]
    profile: MemoryProfile


BATCHES = tuple(2**i for i in range(9))  # 1 ... 256


def _max_batch(config: Config, budget_mb: float, limit: int = 4096) -> int:
    """Largest training batch whose predicted step peak fits (0: not even batch 1)."""
    lo, hi = 0, 1
    while hi <= limit and predict(config, hi).train_step_mb <= budget_mb:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the step peak grows monotonically with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predict(config, mid).train_step_mb <= budget_mb else (lo, mid)
    return lo


def _time_factors(config: Config, measure: bool) -> tuple[dict[str, float], str]:
    if not measure:
        return dict(CALIBRATION["time"]), "calibration"
    base = train_throughput(training_variant(config, "float32", False), steps=5)
    ckpt = train_throughput(training_variant(config, "float32", True), steps=5)
    low = train_throughput(training_variant(config, "bfloat16", False), steps=5)
    return {"checkpointing": base / ckpt, "bfloat16": base / low}, "measured"


def recommend(config: Config, budget_mb: float, measure_time: bool = False) -> Recommendation:
    """The largest batch that fits ``budget_mb``, and what checkpointing and bf16 save.

    Args:
        config: the candidate.
        budget_mb: memory available to one trial.
        measure_time: time a few training steps of each option here (seconds to a
            minute) instead of using the calibration's median time factors.

    Returns:
        Whether the config fits, the largest batch, each option's saving, and a table of
        predicted step peaks by batch.
    """
    plain = training_variant(config, "float32", False)
    ckpt = training_variant(config, "float32", True)
    low = training_variant(config, "bfloat16", False)
    base = predict(plain)
    factors, source = _time_factors(config, measure_time)
    options = []
    both = training_variant(config, "bfloat16", True)
    for name, variant in (("checkpointing", ckpt), ("bfloat16", low),
                          ("bfloat16+checkpointing", both)):
        step = predict(variant).train_step_mb
        factor = (factors["checkpointing"] * factors["bfloat16"] if "+" in name
                  else factors[name])
        options.append(Option(name, step, base.train_step_mb - step,
                              1 - step / base.train_step_mb, _max_batch(variant, budget_mb),
                              factor, source))
    profile = predict(config)
    max_batch = _max_batch(config, budget_mb)
    fits = profile.train_peak_mb <= budget_mb
    reason = _reason(profile, budget_mb, max_batch, options)
    table = tuple((b, predict(plain, b).train_step_mb,
                   predict(ckpt, b).train_step_mb, predict(low, b).train_step_mb)
                  for b in BATCHES)
    return Recommendation(budget_mb, fits, reason, profile.batch, max_batch, tuple(options),
                          table, profile)


def _reason(p: MemoryProfile, budget: float, max_batch: int, options: list[Option]) -> str:
    if p.train_peak_mb <= budget:
        return (f"fits: predicted training peak {p.train_peak_mb:.0f} MB <= budget "
                f"{budget:.0f} MB")
    if p.validation_mb > budget and p.train_step_mb <= budget:
        return (f"the training step fits ({p.train_step_mb:.0f} MB) but validation at batch "
                f"{p.val_batch} needs {p.validation_mb:.0f} MB > {budget:.0f} MB")
    if max_batch == 0 and all(o.max_batch == 0 for o in options):
        return (f"does not fit at all: even batch 1 with checkpointing and bf16 exceeds "
                f"{budget:.0f} MB")
    best = max(options, key=lambda o: o.max_batch)
    return (f"batch {p.batch} needs {p.train_step_mb:.0f} MB > {budget:.0f} MB: use batch "
            f"<= {max_batch}, or {best.name} (batch <= {best.max_batch})")


def format_report(config: Config, budget_mb: float | None = None,
                  measure_time: bool = False) -> str:
    """What ``diffnas memory --config cfg.json [--budget-mb M]`` prints.

    Args:
        config: the candidate.
        budget_mb: memory available to one trial (none: report without a budget).
        measure_time: measure the options' time factors here (see :func:`recommend`).

    Returns:
        The report, lines joined by newlines.
    """
    rec = recommend(config, float("inf") if budget_mb is None else budget_mb, measure_time)
    meta = CALIBRATION["fitted_on"]
    return "\n".join([*_summary(rec.profile), "", *_table(rec, budget_mb), "",
                      *_options(rec, budget_mb),
                      (f"(predicted; calibrated on MLX {meta['mlx']}, {meta['backend']}, "
                      f"{meta['blas']})")])


def _summary(p: MemoryProfile) -> list[str]:
    ckpt = ", checkpointing" if p.checkpointing else ""
    return [(f"params {p.params:,}: weights {p.weights_mb:.1f} MB, AdamW state "
            f"{p.optimizer_mb:.1f} MB, EMA {p.ema_mb:.1f} MB"),
            (f"sampling peak: batch 1 {p.sample_b1_mb:.1f} MB, batch {p.sample_n} "
            f"{p.sample_bn_mb:.1f} MB"),
            (f"training peak at batch {p.batch} ({p.dtype}{ckpt}): step {p.train_step_mb:.1f} MB,"
            f" validation forward (batch {p.val_batch}) {p.validation_mb:.1f} MB")]


def _table(rec: Recommendation, budget_mb: float | None) -> list[str]:
    lines = [f"{'batch':>6} {'float32':>9} {'+ckpt':>9} {'bf16':>9}   training step peak, MB"]
    for b, f32, ckpt, low in rec.table:
        over = "  over budget" if budget_mb is not None and f32 > budget_mb else ""
        lines.append(f"{b:>6} {f32:>9.1f} {ckpt:>9.1f} {low:>9.1f}{over}")
    return lines


def _options(rec: Recommendation, budget_mb: float | None) -> list[str]:
    lines = [f"{o.name:<23} saves {o.saving_mb:7.1f} MB ({o.saving:.0%}) at {o.time_factor:.2f}x"
             f" step time ({o.time_source})"
             + ("" if budget_mb is None else f"; largest batch {o.max_batch}")
             for o in rec.options]
    if budget_mb is not None:
        lines.append(f"budget {budget_mb:.0f} MB: largest float32 batch {rec.max_batch}; "
                     f"{rec.reason}")
    return lines


