"""``diffnas report``: a study as one self-contained, shareable HTML file.

:func:`gather` reads the study (through :mod:`search.storage.record` and
:func:`search.report.front`) into one JSON document; :func:`render` inlines it, the page
template (``report.html``) and the vendored charting library (``vendor/``, Apache ECharts)
into one HTML file that opens from disk with no network.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from search.html.gather import gather
from search.html.page import render

__all__ = ["gather", "render", "write_report"]


def write_report(study: optuna.Study, results: Path, out: Path) -> Path:
    """Write the report of ``study`` to ``out`` (its folder is created); returns ``out``.

    Args:
        study: the search study; its derived points are included.
        results: the results folder, where sample grids are found when their stored
            paths are not there.
        out: the HTML file to write.
    """
    html = render(gather(study, results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
