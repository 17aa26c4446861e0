"""The search space: a user-editable TOML file, decoded into Optuna distributions and configs.

A space file has settings tables (``[study]``, ``[data]``, ``[evaluate]``, ``[rungs]``,
``[constraints]``, ``[adapt]``; :mod:`search.space_settings`) and one table per config
section (``[unet]``, ``[schedule]``, ``[train]``) whose keys are fields of
:mod:`engine.config`. A value there is either fixed (``steps = 200``) or searched
(:mod:`search.space_params`)::

    base_width = { choice = [16, 32] }          # categorical; lists are allowed as values
    steps = { int = [4, 16], log = true }       # integers, inclusive; optional step
    learning_rate = { float = [3e-4, 3e-3], log = true }

This module holds the parsed :class:`SearchSpace`, the shipped presets and the entry points
that read a file; the key-by-key checks are :mod:`search.space_toml`. Every error names the
file, the line where the file has one, the table and the key.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution

from engine.config import Config
from search.space_params import CONFIG_SECTIONS, Param
from search.space_settings import (
    AdaptSettings,
    Constraints,
    DataSettings,
    EvalSettings,
    RungSettings,
    StudySettings,
)
from search.space_toml import Locator, SpaceError, read_tables

PRESETS_DIR = Path(__file__).parent / "presets"


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
    """Parse and validate the TOML text of a space file (see the module docstring).

    Raises:
        SpaceError: naming the file, line, table and key of the first problem.
    """
    where = Locator(text, origin)
    settings, params = read_tables(text, where)
    space = SearchSpace(name=name, source=text, params=params, **settings)
    _check_decodable(space, where)
    return space


def _check_decodable(space: SearchSpace, where: Locator) -> None:
    """Every value of every parameter must be valid in at least one combination."""
    rng = random.Random(0)
    samples = [_random_values(space, rng) for _ in range(48)]
    for p in space.params:
        for value in p.candidates(rng):
            errors = []
            for base in samples:
                try:
                    space.decode({**base, p.name: p.encode(value)})
                    break
                except (ValueError, TypeError) as err:
                    errors.append(err)
            else:
                culprit = _named_param(space, str(errors[0])) if p.kind == "fixed" else None
                if culprit is not None:
                    p = culprit
                section, key = p.name.split(".", 1)
                what = "" if p.kind == "fixed" else f"value {value!r}: "
                raise SpaceError(f"{where(section, key)}[{section}] {key}: {what}never gives a "
                                 f"valid config ({errors[0]})")


def _named_param(space: SearchSpace, message: str) -> Param | None:
    """The fixed parameter a config error names (``TrainConfig.lr_decay='x': ...``), so that
    the error points at the line to fix rather than at the first fixed key."""
    for p in space.params:
        section, key = p.name.split(".", 1)
        kind = CONFIG_SECTIONS.get(section)
        if p.kind == "fixed" and kind and message.startswith(f"{kind.__name__}.{key}="):
            return p
    return None


def _random_values(space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in space.params:
        if p.searched:
            values[p.name] = p.encode(rng.choice(p.candidates(rng)))
    return values
