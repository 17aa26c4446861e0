"""One searched or fixed config field of a space file, and how its values travel through
Optuna.

A :class:`Param` is named ``section.field`` after a field of :mod:`engine.config`. Optuna's
categorical distribution holds only scalars, so a list-valued choice travels as its JSON
text and is decoded back; :meth:`Param.allows` compares values across the tuple/list
boundary because a config holds tuples where TOML gives lists.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from engine.config import ScheduleConfig, TrainConfig, UNetConfig

CONFIG_SECTIONS: dict[str, type] = {"unet": UNetConfig, "schedule": ScheduleConfig,
                                    "train": TrainConfig}
DATA_FIELDS = ("image_size", "channels")  # set from [data], never searched


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
