"""The search space: a user-editable TOML file, decoded into Optuna distributions and configs.

A space file has settings tables (``[study]``, ``[data]``, ``[evaluate]``, ``[rungs]``,
``[constraints]``) and one table per config section (``[unet]``, ``[schedule]``,
``[train]``) whose keys are fields of :mod:`engine.config`. A value there is either fixed
(``steps = 200``) or searched::

    base_width = { choice = [16, 32] }          # categorical; lists are allowed as values
    steps = { int = [4, 16], log = true }       # integers, inclusive; optional step
    learning_rate = { float = [3e-4, 3e-3], log = true }

Every error names the file, the line where the file has one, the table and the key.
"""

from __future__ import annotations

import difflib
import json
import random
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from engine.config import Config, ScheduleConfig, TrainConfig, UNetConfig, field_value

PRESETS_DIR = Path(__file__).parent / "presets"
CONFIG_SECTIONS: dict[str, type] = {"unet": UNetConfig, "schedule": ScheduleConfig,
                                    "train": TrainConfig}
DATA_FIELDS = ("image_size", "channels")  # set from [data], never searched
SAMPLERS = ("tpe", "nsga2")
MEMORY_OBJECTIVES = ("sample", "train", "max")


class SpaceError(ValueError):
    """An invalid search-space file; the message names the file, line, table and key."""


@dataclass(frozen=True)
class StudySettings:
    """How the study runs: target trial count, sampler, seed, pruner, hardware, evolution.

    ``latency_table``: every worker measures a latency table of its device class, so that
    the coordinator predicts each candidate's latency before dispatch (search.hooks.hardware).
    ``target_device``: the device class whose latency the study reports (default: the
    first class seen). ``mutation_rate``: the share of trials that mutate a Pareto-front
    trial instead of asking the sampler; such a child starts from its parent's weights and
    trains for ``inherit_budget`` of the training steps (search.hooks.evolution).
    """

    trials: int = 12
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "none"
    prune_dominated: bool = False  # mo-asha: also prune at stage 1 on best-case dominance
    startup_trials: int = 10
    population: int = 8
    reference_point: tuple[float, ...] = ()
    latency_table: bool = True
    target_device: str = ""
    mutation_rate: float = 0.0
    inherit_budget: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference_point", tuple(float(v) for v in self.reference_point))
        _require(self.trials >= 1, "trials", "must be >= 1")
        _require(self.sampler in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}")
        _require(self.startup_trials >= 0, "startup_trials", "must be >= 0")
        _require(self.population >= 2, "population", "must be >= 2")
        _require(len(self.reference_point) in (0, 3), "reference_point",
                 "needs 3 values: fid, latency_ms, peak_mem_mb")
        _require(0.0 <= self.mutation_rate <= 1.0, "mutation_rate", "must be in [0, 1]")
        _require(0.0 < self.inherit_budget <= 1.0, "inherit_budget", "must be in (0, 1]")
        _require(not self.target_device or self.latency_table, "target_device",
                 "needs latency_table = true (latency is converted through the tables)")


@dataclass(frozen=True)
class DataSettings:
    """The dataset every trial trains on (shipped to workers by the coordinator)."""

    dataset: str = "digits"
    image_size: int = 16
    val_fraction: float = 0.1
    split_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.image_size >= 4, "image_size", "must be >= 4")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")


@dataclass(frozen=True)
class EvalSettings:
    """The final evaluation of a trial and how its objectives are measured."""

    fid_samples: int = 500
    grid_images: int = 64
    memory: str = "sample"
    latency_runs: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.fid_samples >= 4, "fid_samples", "must be >= 4")
        _require(self.grid_images >= 1, "grid_images", "must be >= 1")
        _require(self.memory in MEMORY_OBJECTIVES, "memory",
                 f"must be one of {', '.join(MEMORY_OBJECTIVES)}")
        _require(self.latency_runs >= 5, "latency_runs", "must be >= 5 (measurement protocol)")


@dataclass(frozen=True)
class RungSettings:
    """Rungs at ``min_steps * eta**k`` training steps; ``min_steps = 0`` means only the end."""

    min_steps: int = 0
    eta: int = 3

    def __post_init__(self) -> None:
        _require(self.min_steps >= 0, "min_steps", "must be >= 0")
        _require(self.eta >= 2, "eta", "must be >= 2")

    def steps(self, total: int) -> tuple[int, ...]:
        """The rung steps for a trial of ``total`` training steps; the last is ``total``."""
        out: list[int] = []
        step = self.min_steps
        while 0 < step < total:
            out.append(step)
            step *= self.eta
        return (*out, total)


@dataclass(frozen=True)
class Constraints:
    """Optional hard limits; a trial over one is infeasible (recorded via set_constraint)."""

    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_params: int | None = None
    max_flops: int | None = None  # per forward pass at batch 1 (engine.model.cost)
    # The whole trial (measurement, training, validation, evaluation) on its worker:
    # predicted before anything is built, then measured at every phase (engine.device.memory).
    max_trial_memory_mb: float | None = None
    # Stage 0 prunes on the predicted latency (search.hooks.hardware) only when it is over
    # max_latency_ms by more than this fraction: the predictor is not exact.
    latency_margin: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_"):
                _require(value is None or value > 0, f.name, "must be > 0")
        _require(self.latency_margin >= 0, "latency_margin", "must be >= 0")

    def limits(self) -> dict[str, float]:
        """The set limits by name (``latency_ms``, ``memory_mb``, ``params``, ``flops``,
        ``trial_memory_mb``)."""
        return {f.name.removeprefix("max_"): float(getattr(self, f.name))
                for f in fields(self)
                if f.name.startswith("max_") and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class AdaptSettings:
    """Architecture adaptation during training (search.hooks.adapt), off unless switched on.

    At a rung before the last, a running trial is stopped and continued as a new trial
    whose architecture is one morphism away and whose weights are its own, morphed:

    - ``shrink_above_ms``: its latency (target device) is over this: narrow, shallower or
      without an attention level, the largest such neighbour that is predicted to fit;
    - ``grow``: its validation loss improved by less than ``plateau`` (relative) over the
      last ``patience`` validation points (every ``eval_every`` steps and at every rung)
      and is above ``target_loss`` (default: the
      median validation loss of the study's trials at that step): wider, deeper or with
      attention, the neighbour predicted to cost the least latency.

    The new trial trains for the steps its parent had left. ``max_depth`` caps how many
    adaptations one lineage makes.
    """

    grow: bool = False
    plateau: float = 0.02
    patience: int = 2
    target_loss: float | None = None
    shrink_above_ms: float | None = None
    max_depth: int = 2

    def __post_init__(self) -> None:
        _require(self.plateau >= 0, "plateau", "must be >= 0")
        _require(self.patience >= 1, "patience", "must be >= 1")
        _require(self.target_loss is None or self.target_loss >= 0, "target_loss",
                 "must be >= 0")
        _require(self.shrink_above_ms is None or self.shrink_above_ms > 0, "shrink_above_ms",
                 "must be > 0")
        _require(self.max_depth >= 1, "max_depth", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.grow or self.shrink_above_ms is not None


SETTINGS: dict[str, type] = {"study": StudySettings, "data": DataSettings,
                             "evaluate": EvalSettings, "rungs": RungSettings,
                             "constraints": Constraints, "adapt": AdaptSettings}


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {why}")


@dataclass(frozen=True)
class Param:
    """One searched or fixed config field, named ``section.field``."""

    name: str
    kind: str  # fixed | choice | int | float
    value: Any = None
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution; list-valued choices travel as their JSON text."""
        if self.kind == "choice":
            return CategoricalDistribution([_encode(c) for c in self.choices])
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,
                                   step=int(self.step or 1))
        assert self.kind == "float", self.kind
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def allows(self, value: Any) -> bool:
        """Whether the config value ``value`` is one this parameter can take."""
        if self.kind == "fixed":
            return bool(_same(value, self.value))
        if self.kind == "choice":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        inside = self.low <= value <= self.high
        if self.kind == "int":
            on_grid = (value - self.low) % (self.step or 1) == 0
            return inside and value == int(value) and on_grid
        return inside

    def encode(self, value: Any) -> Any:
        """The Optuna parameter value for the config value ``value``."""
        return _encode(value)

    def decode(self, raw: Any) -> Any:
        """The config value for the Optuna parameter value ``raw``."""
        if self.kind == "choice":
            return _decode(raw) if isinstance(raw, str) and raw.startswith("[") else raw
        return raw

    def candidates(self, rng: random.Random) -> list[Any]:
        """Config values worth checking: every choice, or both ends and one inner value."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.choices)
        inner = rng.uniform(self.low, self.high)
        values = [self.low, self.high, inner]
        return [round(v) for v in values] if self.kind == "int" else values


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list) else value


def _same(a: Any, b: Any) -> bool:
    """Config values equal across the tuple/list boundary (TOML gives lists)."""
    return json.dumps(_plain(a)) == json.dumps(_plain(b))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _decode(text: str) -> Any:
    return json.loads(text)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file: settings plus one :class:`Param` per config field it sets."""

    name: str
    source: str
    study: StudySettings = field(default_factory=StudySettings)
    data: DataSettings = field(default_factory=DataSettings)
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    rungs: RungSettings = field(default_factory=RungSettings)
    constraints: Constraints = field(default_factory=Constraints)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    params: tuple[Param, ...] = ()

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the searched parameters, for ``study.ask``."""
        return {p.name: p.distribution() for p in self.params if p.searched}

    def decode(self, values: dict[str, Any], channels: int = 1) -> Config:
        """The candidate config for Optuna parameter ``values``.

        Raises:
            ValueError: the combination is not a valid config (the message names the field).
        """
        sections: dict[str, dict[str, Any]] = {name: {} for name in CONFIG_SECTIONS}
        for p in self.params:
            section, key = p.name.split(".", 1)
            sections[section][key] = p.decode(values[p.name]) if p.searched else p.value
        sections["unet"].update(image_size=self.data.image_size, channels=channels)
        return Config.from_dict(sections)

    def fingerprint(self) -> str:
        """Canonical JSON of everything that defines the search (not the trial target)."""
        doc = {"params": [_param_doc(p) for p in self.params],
               "data": _settings_doc(self.data), "evaluate": _settings_doc(self.evaluate),
               "rungs": _settings_doc(self.rungs), "constraints": _settings_doc(self.constraints)}
        return json.dumps(doc, sort_keys=True)


def _param_doc(p: Param) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in fields(p)}


def _settings_doc(settings: Any) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def presets() -> list[str]:
    """Names of the space files shipped in ``search/presets``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def resolve(spec: str | Path) -> Path:
    """A preset name or a path to a space file.

    Raises:
        SpaceError: neither a preset nor an existing file.
    """
    path = Path(spec)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{spec}.toml"
    if preset.is_file():
        return preset
    raise SpaceError(f"{spec}: no such space file or preset (presets: {', '.join(presets())})")


def load_space(spec: str | Path) -> SearchSpace:
    """Read and validate a space file or preset; it must search at least one value.

    Raises:
        SpaceError: naming the file, line, table and key of the first problem, or the file
            when it searches nothing (an empty file, only settings tables, only fixed values).
    """
    path = resolve(spec)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SpaceError(f"{path}: cannot read space file ({err})") from None
    space = parse_space(text, name=path.stem, origin=str(path))
    if not any(p.searched for p in space.params):  # else: one default config, trained N times
        raise SpaceError(f"{path}: searches nothing: give at least one value in [unet], "
                         "[schedule] or [train] as { choice = [...] }, { int = [low, high] } "
                         "or { float = [low, high] } (examples: search/presets/)")
    return space


def parse_space(text: str, name: str = "space", origin: str = "<space>") -> SearchSpace:
    """Parse and validate the TOML text of a space file (see the module docstring)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{origin}: invalid TOML: {err}") from None
    where = _Locator(text, origin)
    known = set(SETTINGS) | set(CONFIG_SECTIONS)
    for table, body in doc.items():
        if table not in known:
            raise SpaceError(f"{where(table)}unknown table [{table}]{_hint(table, known)}")
        if not isinstance(body, dict):
            raise SpaceError(f"{where(None, table)}{table} must be a table, like [{table}]")
    settings = {t: _settings(kind, doc.get(t, {}), t, where) for t, kind in SETTINGS.items()}
    params = tuple(p for s in CONFIG_SECTIONS for p in _params(s, doc.get(s, {}), where))
    space = SearchSpace(name=name, source=text, params=params, **settings)
    _check_decodable(space, where)
    return space


class _Locator:
    """Finds the line of ``[table] key`` in the source text, for error messages."""

    def __init__(self, text: str, origin: str) -> None:
        self.lines = text.splitlines()
        self.origin = origin

    def __call__(self, table: str | None, key: str | None = None) -> str:
        line = self.line(table, key)
        return f"{self.origin}:{line}: " if line else f"{self.origin}: "

    def line(self, table: str | None, key: str | None) -> int | None:
        current = None
        for number, raw in enumerate(self.lines, 1):
            stripped = raw.strip()
            if stripped.startswith("[") and not stripped.startswith("[["):
                current = stripped.strip("[]").strip()
                if key is None and current == table:
                    return number
            elif (key is not None and table in (None, current)
                  and stripped.split("=")[0].strip() == key):
                return number
        return None


def _hint(word: str, options: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _settings(kind: type, body: dict[str, Any], table: str, where: _Locator) -> Any:
    names = {f.name for f in fields(kind)}
    for key in body:
        if key not in names:
            raise SpaceError(f"{where(table, key)}[{table}] unknown key {key!r}{_hint(key, names)}")
    types = {f.name: str(f.type) for f in fields(kind)}
    for key, value in body.items():
        if not _fits(types[key], value):
            expected = types[key].replace(" | None", "").replace("tuple[float, ...]", "list")
            raise SpaceError(f"{where(table, key)}[{table}] {key}: expected {expected}, "
                             f"got {value!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in body.items()}
    try:
        return kind(**values)
    except (ValueError, TypeError) as err:
        key = str(err).split(":", 1)[0]
        raise SpaceError(f"{where(table, key if key in names else None)}[{table}] {err}") from None


def _fits(annotation: str, value: Any) -> bool:
    """Whether a TOML value has the type of a settings field (annotations are strings)."""
    base = annotation.replace(" | None", "")
    if isinstance(value, bool):
        return base == "bool"
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, (int, float))
    if base == "str":
        return isinstance(value, str)
    if base.startswith("tuple"):
        return isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
    return True


def _params(section: str, body: dict[str, Any], where: _Locator) -> list[Param]:
    names = {f.name for f in fields(CONFIG_SECTIONS[section])} - (
        set(DATA_FIELDS) if section == "unet" else set())
    out = []
    for key, value in body.items():
        loc = where(section, key)
        if key not in names:
            extra = " (set it in [data])" if key in DATA_FIELDS and section == "unet" else ""
            raise SpaceError(f"{loc}[{section}] unknown key {key!r}{extra or _hint(key, names)}")
        try:
            param = _param(f"{section}.{key}", value)
            _check_type(CONFIG_SECTIONS[section], key, param)
            out.append(param)
        except ValueError as err:
            raise SpaceError(f"{loc}[{section}] {key}: {err}") from None
    return out


def _param(name: str, value: Any) -> Param:
    if not isinstance(value, dict):
        return Param(name, "fixed", value=value)
    kinds = [k for k in ("choice", "int", "float") if k in value]
    if len(kinds) != 1:
        raise ValueError("a searched value needs exactly one of choice, int or float")
    kind = kinds[0]
    extra = set(value) - {kind, "log", "step"}
    if extra or (kind == "choice" and len(value) > 1):
        raise ValueError(f"unexpected option {min(extra or set(value) - {kind})!r}")
    if kind == "choice":
        choices = value["choice"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("choice must be a non-empty list")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ValueError("choice has duplicate values")
        return Param(name, "choice", choices=tuple(choices))
    return _range(name, kind, value)


def _range(name: str, kind: str, value: dict[str, Any]) -> Param:
    bounds, log, step = value[kind], value.get("log", False), value.get("step")
    number = int if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise ValueError(f"{kind} must be [low, high] of {kind}s")
    low, high = bounds
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if not isinstance(log, bool):
        raise ValueError("log must be true or false")  # noqa: TRY004 (SpaceError is a ValueError)
    if log and low <= 0:
        raise ValueError("log ranges need low > 0")
    if step is not None and (not isinstance(step, number) or step <= 0 or log):
        raise ValueError("step must be a positive number and cannot be combined with log")
    return Param(name, kind, low=float(low), high=float(high), log=log,
                 step=None if step is None else float(step))


def _check_type(kind: type, key: str, p: Param) -> None:
    """Every value ``p`` can take has the field's exact type (ranges: their bounds)."""
    if p.kind == "float" and str(next(f.type for f in fields(kind) if f.name == key)) == "int":
        raise ValueError("a float range on an integer field; use { int = [low, high] }")
    bounds = [int(p.low), int(p.high)] if p.kind == "int" else [p.low, p.high]
    values = {"fixed": [p.value], "choice": list(p.choices)}.get(p.kind, bounds)
    for value in values:
        try:
            field_value(kind, key, value)
        except ValueError as err:
            raise ValueError(f"{'' if p.kind == 'fixed' else f'value {value!r}: '}{err}") from None


def _check_decodable(space: SearchSpace, where: _Locator) -> None:
    """Every value of every parameter must be valid in at least one combination."""
    rng = random.Random(0)
    samples = [_random_values(space, rng) for _ in range(48)]
    for p in space.params:
        for value in p.candidates(rng):
            errors = []
            for base in samples:
                try:
                    space.decode({**base, p.name: _encode(value)})
                    break
                except (ValueError, TypeError) as err:
                    errors.append(err)
            else:
                section, key = p.name.split(".", 1)
                what = "" if p.kind == "fixed" else f"value {value!r}: "
                raise SpaceError(f"{where(section, key)}[{section}] {key}: {what}never gives a "
                                 f"valid config ({errors[0]})")


def _random_values(space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in space.params:
        if p.searched:
            values[p.name] = _encode(rng.choice(p.candidates(rng)))
    return values
