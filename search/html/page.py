"""The report's one HTML file: the template, the vendored charting library and the data,
inlined, so the file opens from disk with no network."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

LIBRARY = "vendor/echarts.min.js"
TEMPLATE = "report.html"


def render(doc: dict[str, Any]) -> str:
    """The page for a :func:`search.html.gather.gather` document.

    Args:
        doc: the report's data (JSON-serialisable; NaN and infinities become null).

    Returns:
        The complete HTML text, every script, style and image inline.
    """
    folder = resources.files("search.html")
    page = (folder / TEMPLATE).read_text(encoding="utf-8")
    library = (folder / LIBRARY).read_text(encoding="utf-8")
    # "</" inside a script would end it early: JSON allows the escaped form.
    data = json.dumps(_finite(doc), allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    title = str(doc.get("study", "")).replace("&", "&amp;").replace("<", "&lt;")
    return (page.replace("__TITLE__", title)
            .replace("/*__LIBRARY__*/", _script_safe(library))
            .replace("/*__DATA__*/", data))


def _script_safe(text: str) -> str:
    """``text`` safe inside a ``<script>`` element (no closing tag in it)."""
    return text.replace("</script", "<\\/script")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
