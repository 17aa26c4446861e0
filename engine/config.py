"""Typed, validated configuration for one diffusion candidate.

Every config is a frozen dataclass that validates itself on construction and
round-trips through JSON: configs cross process boundaries and live in the study
storage. A bad value raises ``ValueError`` naming the field and the value.

Types are exact: a bool is not an int, a float with a fractional part is not an int, and
a string is not a sequence. Ranges are capped by :data:`LIMITS`, bounds that a U-Net search
on Apple Silicon (at most 512 px, a few hundred channels, days of training) never reaches;
a value past one is a typo, not a candidate.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ACTIVATIONS = ("silu", "gelu", "relu")
RESAMPLES = ("nearest", "transposed")
NORMS = ("group", "layer")
BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
PREDICTIONS = ("eps", "v", "x0")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "adaptive")
SPACINGS = ("uniform", "quadratic", "karras", "trailing", "explicit", "optimized")
DTYPES = ("float32", "bfloat16", "float16")
LR_DECAYS = ("none", "cosine")
LOSS_WEIGHTS = ("none", "min_snr")

# Upper bounds of the integer fields (inclusive). Stable Diffusion's U-Net, far larger than
# anything searched here, has base width 320, multipliers up to 4, 2 res blocks and
# widths up to 1280.
LIMITS = {
    "base_width": 1024,  # the width of level 0
    "width_mult": 16,  # each of width_mults
    "levels": 8,  # len(width_mults): 512 px halves to 4 px after 7 downsamplings
    "width": 4096,  # base_width * multiplier, every level
    "num_res_blocks": 8,
    "head_dim": 1024,
    "time_emb_dim": 4096,
    "sample_steps": 4000,  # ScheduleConfig.steps: DDPM's own schedule has 1000
    "train_steps": 10_000_000,  # TrainConfig.steps, warmup_steps, eval_every
    "batch_size": 4096,
    "num_classes": 65536,
}


def _fail(owner: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r}: {why}")


def _check(cond: bool, owner: str, name: str, value: Any, why: str) -> None:
    if not cond:
        _fail(owner, name, value, why)


def _choice(owner: str, name: str, value: Any, options: tuple[str, ...]) -> None:
    _check(value in options, owner, name, value, f"must be one of {', '.join(options)}")


def _in(owner: str, name: str, value: Any, low: float, high: float) -> None:
    _check(low <= value <= high, owner, name, value, f"must be in [{low:g}, {high:g}]")


def _exact(owner: str, name: str, kind: str, value: Any) -> Any:
    """``value`` as the field type ``kind`` (``int``, ``float``, ``str``, ``bool`` or
    ``tuple[int, ...]``/``tuple[float, ...]``), or ``ValueError`` naming the field."""
    if kind.startswith("tuple["):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{owner}.{name}: expected a list, got {value!r}")
        item = kind.removeprefix("tuple[").split(",")[0]
        return tuple(_scalar(owner, f"{name}[{i}]", item, v) for i, v in enumerate(value))
    return _scalar(owner, name, kind, value)


def _scalar(owner: str, name: str, kind: str, value: Any) -> Any:
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "float" and number and math.isfinite(float(value)):
        return float(value)
    if kind == "int" and number and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    expected = {"int": "int", "float": "a finite number", "str": "str",
                "bool": "true or false"}[kind]
    raise ValueError(f"{owner}.{name}: expected {expected}, got {value!r}")


def field_value(kind: type, name: str, value: Any) -> Any:
    """``value`` as the type of field ``name`` of the config class ``kind`` (exactly: see
    the module docstring), e.g. ``field_value(TrainConfig, "steps", 10.0) == 10``.

    Raises:
        ValueError: ``value`` has another type, naming the field and the value.
    """
    types = {f.name: str(f.type) for f in fields(kind)}
    return _exact(kind.__name__, name, types[name], value)


def _typed(config: Any) -> None:
    """Check every field's type exactly and store it normalised (``10.0`` -> ``10``)."""
    owner = type(config).__name__
    for f in fields(config):
        value = _exact(owner, f.name, str(f.type), getattr(config, f.name))
        object.__setattr__(config, f.name, value)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the noise-prediction U-Net (NHWC).

    ``width_mults[l] * base_width`` is the width of level ``l``; every level but the
    last halves the resolution. ``attn_levels`` lists the levels with self-attention.
    ``num_classes > 0`` makes the network class-conditional (a learned label embedding
    added to the time embedding, Dhariwal & Nichol 2021), with one more, "null" label for
    unconditional calls, so that it supports classifier-free guidance (Ho & Salimans 2022).
    """

    image_size: int = 16
    channels: int = 1
    base_width: int = 32
    width_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    head_dim: int = 32
    norm_groups: int = 8
    norm: str = "group"
    activation: str = "silu"
    dropout: float = 0.0
    resample: str = "nearest"
    separable: bool = False
    time_emb_dim: int = 128
    num_classes: int = 0

    def __post_init__(self) -> None:
        o = "UNetConfig"
        _typed(self)
        _in(o, "image_size", self.image_size, 4, 512)
        _check(self.channels in (1, 3, 4), o, "channels", self.channels, "must be 1, 3 or 4")
        _in(o, "base_width", self.base_width, 4, LIMITS["base_width"])
        _check(1 <= len(self.width_mults) <= LIMITS["levels"], o, "width_mults",
               self.width_mults, f"needs 1 to {LIMITS['levels']} levels")
        _check(all(1 <= m <= LIMITS["width_mult"] for m in self.width_mults), o, "width_mults",
               self.width_mults, f"multipliers must be in [1, {LIMITS['width_mult']}]")
        _check(max(self.widths) <= LIMITS["width"], o, "width_mults", self.width_mults,
               f"widest level {max(self.widths)} is over {LIMITS['width']} channels")
        downs = len(self.width_mults) - 1
        _check(self.image_size % (2**downs) == 0, o, "image_size", self.image_size,
               f"must be divisible by 2**{downs} for {len(self.width_mults)} levels")
        _in(o, "num_res_blocks", self.num_res_blocks, 1, LIMITS["num_res_blocks"])
        _check(all(0 <= a < len(self.width_mults) for a in self.attn_levels), o, "attn_levels",
               self.attn_levels, f"levels must be in [0, {len(self.width_mults) - 1}]")
        _in(o, "head_dim", self.head_dim, 1, LIMITS["head_dim"])
        _check(self.norm_groups >= 1, o, "norm_groups", self.norm_groups, "must be >= 1")
        _choice(o, "norm", self.norm, NORMS)
        _choice(o, "activation", self.activation, ACTIVATIONS)
        _choice(o, "resample", self.resample, RESAMPLES)
        _check(0.0 <= self.dropout < 1.0, o, "dropout", self.dropout, "must be in [0, 1)")
        _check(4 <= self.time_emb_dim <= LIMITS["time_emb_dim"] and self.time_emb_dim % 2 == 0,
               o, "time_emb_dim", self.time_emb_dim,
               f"must be even and in [4, {LIMITS['time_emb_dim']}]")
        _in(o, "num_classes", self.num_classes, 0, LIMITS["num_classes"])
        for width in self.widths:
            _check(width % self.norm_groups == 0, o, "norm_groups", self.norm_groups,
                   f"must divide every level width (width {width})")
        for level in self.attn_levels:
            _check(self.widths[level] % self.head_dim == 0, o, "head_dim", self.head_dim,
                   f"must divide the width {self.widths[level]} of attention level {level}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in self.width_mults)


@dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule, prediction target and sampler.

    Time is continuous, ``t`` in [0, 1]; ``timesteps`` (for ``explicit`` and
    ``optimized`` spacing) lists the sampler's times from high to low, excluding 0.
    The ``adaptive`` sampler (:func:`engine.sampling.adaptive.sample_adaptive`) chooses its own
    steps: ``steps`` caps its network evaluations per sample, ``tolerance`` is its error
    tolerance (absolute and relative), and ``spacing`` does not apply.
    ``guidance`` is the classifier-free guidance weight ``w`` of a class-conditional network
    (Ho & Salimans 2022): the sampler follows ``u + w (c - u)`` of the unconditional and the
    conditional prediction, one network call on twice the batch; 1 is the conditional model
    alone, one call on the batch.
    """

    beta_schedule: str = "cosine"
    prediction: str = "eps"
    sampler: str = "ddim"
    steps: int = 20
    eta: float = 0.0
    spacing: str = "trailing"
    timesteps: tuple[float, ...] = ()
    tolerance: float = 0.02
    guidance: float = 1.0

    def __post_init__(self) -> None:
        o = "ScheduleConfig"
        _typed(self)
        _choice(o, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice(o, "prediction", self.prediction, PREDICTIONS)
        _choice(o, "sampler", self.sampler, SAMPLERS)
        _choice(o, "spacing", self.spacing, SPACINGS)
        _in(o, "steps", self.steps, 1, LIMITS["sample_steps"])
        _check(0.0 <= self.eta <= 1.0, o, "eta", self.eta, "must be in [0, 1]")
        _check(self.tolerance > 0.0, o, "tolerance", self.tolerance, "must be > 0")
        _in(o, "guidance", self.guidance, 0.0, 100.0)
        _check(self.sampler != "adaptive" or self.guidance == 1.0, o, "guidance", self.guidance,
               "must be 1 with the adaptive sampler (its error control runs on one prediction)")
        _check(self.sampler != "adaptive" or self.steps >= 3, o, "steps", self.steps,
               "must be >= 3 for the adaptive sampler (one step and the final denoise)")
        if self.spacing in ("explicit", "optimized"):
            ts = self.timesteps
            _check(len(ts) == self.steps, o, "timesteps", ts,
                   f"needs exactly steps={self.steps} values for spacing={self.spacing}")
            _check(all(0.0 < t <= 1.0 for t in ts), o, "timesteps", ts, "values must be in (0, 1]")
            _check(all(a > b for a, b in zip(ts, ts[1:])), o, "timesteps", ts,
                   "must be strictly decreasing")
        else:
            _check(not self.timesteps, o, "timesteps", self.timesteps,
                   "only allowed with spacing=explicit or optimized")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW with linear warm-up, EMA and gradient clipping.

    ``lr_decay = "cosine"`` takes the learning rate from its peak after the warm-up down to
    zero at ``steps`` (half a cosine); ``"none"`` holds it. A short run that ends at zero
    learning rate lands in a sharper minimum than one cut off at the peak
    (benchmarks/legibility.md measures what it does for the demo's digits).
    ``loss_weight = "min_snr"`` weights each noise level's loss by min-SNR-5 (Hang et al.
    2023, :func:`engine.sampling.diffusion.diffusion_loss`); validation losses stay
    unweighted, so that trials compare at a rung whatever they train with.
    ``label_dropout`` is the share of training images of a class-conditional network
    (``UNetConfig.num_classes > 0``) shown with the null label, which trains the
    unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022: 0.1-0.2).
    """

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    lr_decay: str = "none"
    loss_weight: str = "none"
    label_dropout: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    eval_every: int = 100
    checkpointing: bool = False

    def __post_init__(self) -> None:
        o = "TrainConfig"
        _typed(self)
        _in(o, "steps", self.steps, 1, LIMITS["train_steps"])
        _in(o, "batch_size", self.batch_size, 1, LIMITS["batch_size"])
        _check(self.learning_rate > 0.0, o, "learning_rate", self.learning_rate, "must be > 0")
        _in(o, "warmup_steps", self.warmup_steps, 0, LIMITS["train_steps"])
        _check(self.weight_decay >= 0.0, o, "weight_decay", self.weight_decay, "must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, o, "ema_decay", self.ema_decay, "must be in [0, 1)")
        _check(0.0 <= self.label_dropout < 1.0, o, "label_dropout", self.label_dropout,
               "must be in [0, 1)")
        _check(self.grad_clip >= 0.0, o, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _in(o, "eval_every", self.eval_every, 1, LIMITS["train_steps"])
        _check(self.seed >= 0, o, "seed", self.seed, "must be >= 0")
        _choice(o, "dtype", self.dtype, DTYPES)
        _choice(o, "lr_decay", self.lr_decay, LR_DECAYS)
        _choice(o, "loss_weight", self.loss_weight, LOSS_WEIGHTS)


_SECTIONS = {"unet": UNetConfig, "schedule": ScheduleConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """One candidate: architecture, sampling schedule and training settings."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.schedule.guidance == 1.0 or self.unet.num_classes > 0, "ScheduleConfig",
               "guidance", self.schedule.guidance,
               "needs a class-conditional network (UNetConfig.num_classes > 0)")

    @property
    def passes(self) -> int:
        """Network batches per sampler step and image: 2 under classifier-free guidance."""
        return 2 if self.schedule.guidance != 1.0 else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a config from plain data; unknown sections or keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected an object, got {type(data).__name__}")
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"config: unknown section {sorted(unknown)[0]!r}")
        parts = {name: _section(kind, data.get(name, {}), name) for name, kind in _SECTIONS.items()}
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a JSON config file; every error names the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None


def _section(kind: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config.{name}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{kind.__name__}: unknown field {sorted(unknown)[0]!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return kind(**values)
