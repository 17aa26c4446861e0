"""The TOML of a space file, checked table by table and key by key into settings records
and :class:`~search.space_params.Param` values.

Checks run in the order a reader fixes them: the TOML syntax, unknown tables, each settings
table's keys, types and values, then each config section's keys and values. The first
problem raises :class:`SpaceError` naming the file, the line where the file has one, the
table and the key, with a did-you-mean hint for a misspelt name.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import fields
from typing import Any

from engine.config import field_value
from search.space_params import CONFIG_SECTIONS, DATA_FIELDS, Param
from search.space_settings import SETTINGS


class SpaceError(ValueError):
    """An invalid search-space file; the message names the file, line, table and key."""


def read_tables(text: str, where: Locator) -> tuple[dict[str, Any], tuple[Param, ...]]:
    """The settings records by table name, and the params of every config section.

    Args:
        text: the TOML text of a space file.
        where: the locator of ``text``, for error messages.

    Raises:
        SpaceError: invalid TOML, an unknown table, or the first bad key or value.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{where.origin}: invalid TOML: {err}") from None
    known = set(SETTINGS) | set(CONFIG_SECTIONS)
    for table, body in doc.items():
        if table not in known:
            raise SpaceError(f"{where(table)}unknown table [{table}]{_hint(table, known)}")
        if not isinstance(body, dict):
            raise SpaceError(f"{where(None, table)}{table} must be a table, like [{table}]")
    settings = {t: _settings(kind, doc.get(t, {}), t, where) for t, kind in SETTINGS.items()}
    params = tuple(p for s in CONFIG_SECTIONS for p in _params(s, doc.get(s, {}), where))
    return settings, params


class Locator:
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


def _settings(kind: type, body: dict[str, Any], table: str, where: Locator) -> Any:
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


def _params(section: str, body: dict[str, Any], where: Locator) -> list[Param]:
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

