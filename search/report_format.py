"""How values read in the terminal reports (:mod:`search.report`, :mod:`search.report_trial`):
aligned tables, cells, a record's fields on one line, a worker's device.

Numbers show 4 significant digits and a missing value shows ``-``, so that columns stay
narrow and every report rounds alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` under ``headers``, each column padded to its widest cell."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, *body])


def cell(value: Any) -> str:
    """One table cell: ``-`` for None, 4 significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def device_line(d: Mapping[str, Any]) -> str:
    """``cpu: <chip> (<memory> GB, <blas>)`` from a worker's device profile (BLAS on CPU only)."""
    blas = f", {str(d.get('blas', '')).split(' ')[0]}" if d.get("backend") == "cpu" else ""
    return f"{d.get('backend')}: {d.get('chip')} ({d.get('memory_gb')} GB{blas})"


def inline(doc: Mapping[str, Any]) -> str:
    """A record's fields on one line, numbers to 4 significant digits (JSON, so a field can
    be searched for by its stored name)."""
    return json.dumps(_rounded(doc), sort_keys=True, default=str)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value

