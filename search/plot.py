"""The Pareto front as a picture (``results/<study>/pareto.png``).

One panel per pair of objectives. Trials and derived points (``d<n>``) are drawn with
different markers; the front, dominated and infeasible points with different colours;
each panel's two-objective front is joined by a staircase line; labels are placed where
they overlap no other label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a worker or a CI machine

import matplotlib.pyplot as plt  # after the backend is chosen
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from search import pareto
from search.report import Front
from workers.records import OBJECTIVES

LABELS = {"fid": "FID", "latency_ms": "latency (ms)", "peak_mem_mb": "peak memory (MB)"}
PAIRS = ((0, 1), (0, 2), (1, 2))
# Trials are circles and stars, derived points diamonds; colour is the point's standing.
STYLES: dict[tuple[str, str], dict[str, Any]] = {
    ("dominated", "trial"): {"c": "0.65", "marker": "o", "s": 24},
    ("infeasible", "trial"): {"c": "tab:red", "marker": "x", "s": 36},
    ("non-dominated", "trial"): {"c": "tab:blue", "marker": "*", "s": 110, "edgecolors": "k",
                                 "linewidths": 0.5},
    ("dominated", "derived"): {"facecolors": "none", "edgecolors": "tab:orange", "marker": "D",
                               "s": 36},
    ("infeasible", "derived"): {"c": "tab:red", "marker": "D", "s": 30, "alpha": 0.5},
    ("non-dominated", "derived"): {"c": "tab:orange", "marker": "D", "s": 60, "edgecolors": "k",
                                   "linewidths": 0.5},
}
# Label offsets in points, tried in turn until one overlaps no label placed before it.
OFFSETS = tuple((dx, dy) for r in (4, 12, 20, 28) for dx, dy in
                ((r, r), (r, -r - 6), (-r - 8, r), (-r - 8, -r - 6), (0, r + 4), (0, -r - 10)))


def plot_front(result: Front, path: Path, title: str = "") -> Path:
    """Save :func:`draw_front` of ``result`` as a PNG at ``path``; returns ``path``."""
    fig = draw_front(result, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_front(result: Front, title: str = "") -> Figure:
    """The figure: one panel per pair of objectives (the caller closes it)."""
    fig, axes = plt.subplots(1, len(PAIRS), figsize=(15, 4.6))
    for ax, (i, j) in zip(axes, PAIRS):
        _panel(ax, result, i, j)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title + ': ' if title else ''}Pareto front of {len(result.trials)} points, "
                 f"hypervolume {result.hypervolume:.4g}")
    fig.tight_layout()
    for ax, (i, j) in zip(axes, PAIRS):
        _labels(ax, result, i, j)  # after the layout: placement needs the final geometry
    return fig


def _panel(ax: Axes, result: Front, i: int, j: int) -> None:
    p = result.points[:, [i, j]]
    derived = np.array([label.startswith("d") for label in result.labels], bool)
    line = _staircase(p[result.feasible])
    if len(line):
        ax.step(*line.T, where="post", c="tab:blue", lw=1, alpha=0.6, label="front (this pair)")
    groups = {"dominated": result.feasible & ~result.on_front, "infeasible": ~result.feasible,
              "non-dominated": result.on_front}
    for (group, kind), style in STYLES.items():
        mask = groups[group] & (derived if kind == "derived" else ~derived)
        if mask.any():
            ax.scatter(*p[mask].T, label=f"{group} {kind}", **style)
    ax.set_xlabel(LABELS[OBJECTIVES[i]])
    ax.set_ylabel(LABELS[OBJECTIVES[j]])
    ax.grid(alpha=0.3)


def _staircase(points: np.ndarray) -> np.ndarray:
    """The points non-dominated in these two objectives, by the first (the step line)."""
    if not len(points):
        return points
    front = points[pareto.pareto_mask(points)]
    return front[np.lexsort((front[:, 1], front[:, 0]))]


def _labels(ax: Axes, result: Front, i: int, j: int) -> list[Annotation]:
    """Label the front and every derived point, each where it overlaps no earlier label."""
    shown = [k for k, label in enumerate(result.labels)
             if result.on_front[k] or label.startswith("d")]
    renderer = ax.figure.canvas.get_renderer()  # type: ignore[attr-defined]
    placed: list[Bbox] = []
    out = []
    for k in sorted(shown, key=lambda k: tuple(result.points[k, [i, j]])):
        for dx, dy in OFFSETS:
            text = ax.annotate(result.labels[k], tuple(result.points[k, [i, j]]), fontsize=7,
                               xytext=(dx, dy), textcoords="offset points")
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == OFFSETS[-1]:
                break
            text.remove()
        placed.append(box)
        out.append(text)
    return out


def label_boxes(fig: Figure) -> list[list[Bbox]]:
    """Per panel, the window extents of the point labels (what the tests check)."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    return [[t.get_window_extent(renderer) for t in ax.texts] for ax in fig.axes]
