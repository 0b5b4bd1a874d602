"""The paper's fusion tables and figures, as CSV and PNG files in PROJECT/results.

Figures are matplotlib `Figure` objects drawn with the Agg canvas, never through
pyplot, so making them changes no global state: napari's own Qt figures and a
headless server are both left alone. The widget can show the same `figures()`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from ..common.atomic import atomic_output
from . import layout
from .fusion import SHARES, UNRATED, FusionReport, fusion_report

COLOURS = {"good": "#2e7d32", "medium": "#f9a825", "bad": "#c62828", UNRATED: "#9e9e9e"}
DPI = 120
TABLES = ("rating_counts.csv", "fused_counts.csv", "agreement_matrix.csv", "agreement_shares.csv", "fused_ratings.csv")
FIGURES = ("rating_counts.png", "fused_counts.png", "agreement_matrix.png")


def write_results(root: str | os.PathLike[str], report: FusionReport | None = None) -> list[Path]:
    """Write the fusion tables (CSV) and figures (PNG) of a project into its results folder; returns the files.

    `report`: the project's `fusion_report`, when the caller has it already (it reads every rating file).
    Each file is replaced whole (a viewer never sees half of one).
    """
    root = Path(root)
    _matplotlib()  # before anything is written: a missing matplotlib leaves no half set of results
    report = fusion_report(root) if report is None else report
    folder = layout.results_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables(report).items():
        written.append(_write_text(folder / name, _csv(rows)))
    for name, figure in figures(report).items():
        path = folder / name
        with atomic_output(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
        written.append(path)
    return written


# --- tables --------------------------------------------------------------------------------------------------


def tables(report: FusionReport) -> dict[str, list[list]]:
    """file name -> rows (header first) of each table."""
    models = report.models
    counts = [["model", *layout.RATINGS, "rated"]]
    for model, given in report.rating_counts.items():
        counts.append([model, *given.values(), sum(given.values())])
    fused = [["rating", "patches"], *([k, v] for k, v in report.fused_counts.items()), [UNRATED, report.undecided]]
    matrix = [["model", *models]]
    for i, model in enumerate(models):
        matrix.append([model, *(_number(v) for v in report.agreement[i])])
    shares = [["agreement", "patches", "share"]]
    for name in SHARES:
        share = report.shares[name]
        shares.append([name, "" if share is None else round(share * report.complete), _number(share)])
    per_patch = [["patch", *models, "fused"]]
    for patch in report.patches:
        per_patch.append(
            [patch, *(report.ratings.get((patch, m), "") for m in models), report.fused.get(patch) or UNRATED]
        )
    return dict(zip(TABLES, (counts, fused, matrix, shares, per_patch), strict=True))


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def _csv(rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


# --- figures -------------------------------------------------------------------------------------------------


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise layout.ReviewError("the fusion figures need matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float):
    figure_class, canvas = _matplotlib()
    figure = figure_class(figsize=(width, height), layout="constrained")
    canvas(figure)
    return figure


def figures(report: FusionReport) -> dict[str, object]:
    """file name -> matplotlib Figure: rating counts per model, fused counts, the agreement matrix."""
    return dict(zip(FIGURES, (counts_figure(report), fused_figure(report), agreement_figure(report)), strict=True))


def counts_figure(report: FusionReport):
    """Grouped bars: for each model, how many patches were rated good, medium and bad."""
    import numpy as np

    models = report.models
    figure = _figure(max(4.0, 1.2 * len(models) + 2), 3.2)
    ax = figure.add_subplot()
    x = np.arange(len(models))
    width = 0.8 / len(layout.RATINGS)
    for k, rating in enumerate(layout.RATINGS):
        heights = [report.rating_counts[m][rating] for m in models]
        bars = ax.bar(x + (k - 1) * width, heights, width, label=rating, color=COLOURS[rating])
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, models)
    _whole_numbers(ax)
    ax.set_ylabel("patches")
    ax.set_title("Ratings per model")
    ax.legend(frameon=False)
    return figure


def fused_figure(report: FusionReport):
    """Bars: patches per fused rating (good if any model is, bad only if all are), and those still undecided."""
    names = [*layout.RATINGS, UNRATED]
    heights = [*report.fused_counts.values(), report.undecided]
    figure = _figure(4.0, 3.2)
    ax = figure.add_subplot()
    bars = ax.bar(names, heights, color=[COLOURS[n] for n in names])
    ax.bar_label(bars, fontsize=8)
    _whole_numbers(ax)
    ax.set_ylabel("patches")
    ax.set_title("Fused rating")
    return figure


def _whole_numbers(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def agreement_figure(report: FusionReport):
    """Heatmap of the share of patches where two models got the same rating, the share written in each cell."""
    import numpy as np

    models = report.models
    size = max(3.5, 0.9 * len(models) + 2)
    figure = _figure(size, size - 0.5)
    ax = figure.add_subplot()
    matrix = np.asarray(report.agreement, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
    for i in range(len(models)):
        for j in range(len(models)):
            value = matrix[i, j]
            text = "-" if math.isnan(value) else f"{value:.2f}"
            colour = "grey" if math.isnan(value) else "black" if value > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_title("Rating agreement")
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of patches")
    return figure
