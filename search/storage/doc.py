"""A stored record's JSON form: one object per record, unknown keys kept (``extra``).

Every stage record of :mod:`search.storage.record` and :mod:`search.storage.lineage` is a
:class:`Doc`, so an older or richer document survives a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeVar

D = TypeVar("D", bound="Doc")


@dataclass(frozen=True)
class Doc:
    """A record stored as one JSON object; unknown keys ride along in ``extra``."""

    KEY: ClassVar[str] = ""
    NESTED: ClassVar[Mapping[str, type[Doc]]] = {}  # field -> the record stored in it

    def to_doc(self) -> dict[str, Any]:
        doc = {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        return {**getattr(self, "extra", {}), **doc}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Self:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: _typed(cls, k, v) for k, v in doc.items() if k in names}
        extra = {k: v for k, v in doc.items() if k not in names}
        # every record declares ``extra`` last (a base-class default would precede its fields)
        return cls(**known, extra=extra)  # type: ignore[call-arg]


def plain(value: Any) -> Any:
    """``value`` as JSON-ready builtins (records as objects, tuples as lists)."""
    if isinstance(value, Doc):
        return value.to_doc()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def _typed(cls: type[Doc], name: str, value: Any) -> Any:
    """Nested records come back as records and JSON lists as tuples."""
    nested = cls.NESTED.get(name)
    if nested is not None and value is not None:
        return nested.from_doc(value)
    return _tuples(value)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def maybe(cls: type[D], doc: Mapping[str, Any] | None) -> D | None:
    """The record of ``cls`` stored as ``doc``, or None when nothing was stored."""
    return None if doc is None else cls.from_doc(doc)
