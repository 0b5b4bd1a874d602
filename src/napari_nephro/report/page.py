"""The report as files: one self-contained HTML page per biopsy, and a cohort CSV + HTML index.

Pages embed their images (PNG, base64), so one file can be mailed or archived
alone. Every file is written atomically: a failed write leaves nothing behind.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import numpy as np

from ..annotations import AnnotationSet
from ..annotations.colors import class_color
from ..common.atomic import atomic_output
from ..evaluation.blockwise import read_block
from ..inference.plan import cells
from ..io import Slide
from ..tiling import read_scaled
from .core import COLUMNS, BiopsyReport
from .errors import ReportError
from .inputs import ClassLabels, Tissue, opened_slide, place, read_glomeruli

OVERVIEW_SIDE = 1500  # px, the longer side of the page's slide overview
CSV_NAME, INDEX_NAME = "cohort.csv", "index.html"
SUMMED = ("tissue_mm2", "glomeruli", "globally_sclerosed", "segmentally_sclerosed", "nuclei", "nuclei_in_glomeruli")
LABELS = {  # column -> what the page calls it
    "slide": "Slide",
    "slide_mpp": "Pixel size (µm/px)",
    "tissue_mm2": "Tissue area (mm²)",
    "glomeruli": "Glomeruli",
    "glomeruli_per_mm2": "Glomeruli per mm² of tissue",
    "glomeruli_by_class": "Glomeruli by class",
    "globally_sclerosed": "Globally sclerosed",
    "segmentally_sclerosed": "Segmentally sclerosed",
    "global_sclerosis_pct": "Globally sclerosed (%)",
    "glomerular_area_total_um2": "Glomerular area, total (µm²)",
    "glomerular_area_mean_um2": "Glomerular area, mean (µm²)",
    "glomerular_area_median_um2": "Glomerular area, median (µm²)",
    "glomerular_area_min_um2": "Glomerular area, smallest (µm²)",
    "glomerular_area_max_um2": "Glomerular area, largest (µm²)",
    "nuclei": "Nuclei",
    "nuclei_per_mm2": "Nuclei per mm² of tissue",
    "nuclei_in_glomeruli": "Nuclei inside glomeruli",
    "nuclei_in_glomeruli_per_mm2": "Nuclei per mm² of glomeruli",
    "nuclei_outside_glomeruli": "Nuclei outside glomeruli",
    "nuclei_outside_glomeruli_per_mm2": "Nuclei per mm² of tissue outside glomeruli",
    "glomeruli_mpp": "Glomeruli measured at (µm/px)",
    "models": "Models",
    "error": "Error",
}
STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
    "tr.failed td{color:#b00000}tfoot td{font-weight:bold}img{max-width:100%;height:auto}"
)


def write_biopsy_html(
    report: BiopsyReport,
    out_html: str | os.PathLike[str],
    *,
    slide: Slide | str | os.PathLike[str],
    glomeruli: str | os.PathLike[str] | ClassLabels | AnnotationSet | None = None,
    mpp: float | None = None,
) -> Path:
    """One page: the slide overview with glomerulus outlines in class colours, the numbers, the areas' histogram.

    `glomeruli`: the output the report was made from (a path, or a placed ClassLabels
    / polygons in level-0 px); by default what `biopsy_report` kept on the report.
    An existing page is replaced (it is derived data).
    """
    out = _target(out_html)
    with opened_slide(slide, mpp) as opened:
        shown = _placed(report.placed if glomeruli is None else glomeruli, opened, report)
        overview, legend = overview_png(opened, shown, report.tissue)
    parts = [
        f"<h1>{_e(report.slide)}</h1>",
        f'<p class="error">Failed: {_e(report.error)}</p>' if report.error else "",
        f'<img alt="overview of {_e(report.slide)}" src="data:image/png;base64,{overview}">',
        f"<p>{legend}</p>" if legend else "",
        "<h2>Numbers</h2>",
        _numbers_table(report),
    ]
    if report.glomerulus_areas_um2:
        parts += [
            "<h2>Glomerular areas</h2>",
            f'<img alt="histogram of glomerular areas" src="data:image/png;base64,{_histogram_png(report)}">',
            _area_list(report),
        ]
    _write_text(out, _page(report.slide, "\n".join(p for p in parts if p)))
    return out


def write_cohort(
    reports: list[BiopsyReport], out_dir: str | os.PathLike[str], *, pages: dict[str, str] | None = None
) -> tuple[Path, Path]:
    """`cohort.csv` (one row per slide, failed ones with their error) and `index.html` (linked to each slide's
    page in `pages`, slide name -> path; failed rows in red; totals and means at the bottom). Replaces both."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{folder}: is a file; give a folder for the cohort report")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{folder}: cannot make the folder ({exc.strerror or exc})") from None
    csv_path, index_path = _target(folder / CSV_NAME), _target(folder / INDEX_NAME)
    table, index = csv_text(reports), _index_html(reports, folder, pages or {})
    try:
        with atomic_output(csv_path) as tmp_csv, atomic_output(index_path) as tmp_index:
            tmp_csv.write_text(table, encoding="utf-8", newline="")
            tmp_index.write_text(index, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{folder}: cannot write the cohort report ({exc.strerror or exc})") from None
    return csv_path, index_path


def write_report_csv(reports: list[BiopsyReport], path: str | os.PathLike[str]) -> Path:
    """The rows of `reports` as one CSV file (replaced if there)."""
    out = _target(path)
    _write_text(out, csv_text(reports), newline="")
    return out


def csv_text(reports: list[BiopsyReport]) -> str:
    """COLUMNS as the header, one row per report; empty cells for None."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for report in reports:
        writer.writerow(["" if v is None else v for v in report.row().values()])
    return buffer.getvalue()


# -- the overview ---------------------------------------------------------------------------------
def overview_png(
    slide: Slide, glomeruli: ClassLabels | AnnotationSet | None, tissue: Tissue | None = None
) -> tuple[str, str]:
    """The slide at most OVERVIEW_SIDE px with class outlines, as base64 PNG, and an HTML legend of the classes.

    `tissue`: the report's tissue thumbnail, used (shrunk) when it is at least as fine as the overview."""
    from PIL import Image

    height, width = slide.level_shapes[0]
    step = max(1.0, max(height, width) / OVERVIEW_SIDE)
    rows, cols = cells(height, step), cells(width, step)
    if tissue is not None and tissue.step <= step * 1.001:
        rgb = np.array(Image.fromarray(tissue.rgb).resize((cols, rows), Image.Resampling.BOX))
    else:
        rgb = np.array(read_scaled(slide, (0, 0, cols * step, rows * step), (rows, cols)))
    legend = ""
    if glomeruli is not None:
        values, classes = _class_thumbnail(glomeruli, (rows, cols), step)
        colours = {v: class_color(classes.get(v, f"class {v}")) for v in np.unique(values) if v}
        _draw_outlines(rgb, values, colours)
        names = [classes[v] for v in sorted(classes)] or [f"class {v}" for v in sorted(colours)]
        legend = " ".join(
            f'<span style="color:rgb{class_color(n)}">&#9632;</span> {_e(n)}' for n in dict.fromkeys(names)
        )
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode(), legend


def _class_thumbnail(glomeruli, shape: tuple[int, int], step: float) -> tuple[np.ndarray, dict[int, str]]:
    """Class values on the overview grid: nearest label pixel at each overview pixel's centre."""
    from ..annotations import rasterize

    if isinstance(glomeruli, AnnotationSet):
        classes = {glomeruli.class_id(c): c for c in glomeruli.classes}
        return rasterize(glomeruli, shape, downsample=step, values="class", dtype=np.uint16), classes
    labels = glomeruli
    d = labels.downsample
    fine = [k for k, f in enumerate(labels.level_downsamples) if f * d <= step * 1.001] or [0]
    k = max(fine, key=lambda i: labels.level_downsamples[i])  # the coarsest level still as fine as the overview
    level, f = labels.levels[k], labels.level_downsamples[k] * d
    lh, lw = level.shape[-2:]
    ox, oy = labels.origin
    ys = np.floor(((np.arange(shape[0]) + 0.5) * step - oy) / f).astype(np.int64)
    xs = np.floor(((np.arange(shape[1]) + 0.5) * step - ox) / f).astype(np.int64)
    out = np.zeros(shape, np.int64)
    col_ok = (xs >= 0) & (xs < lw)
    row_ok = np.flatnonzero((ys >= 0) & (ys < lh))
    cols = xs[col_ok]
    for start in range(0, len(row_ok), 256):  # a band of the level's rows at a time
        at = row_ok[start : start + 256]
        band = read_block(level, int(ys[at].min()), int(ys[at].max()) + 1, 0, lw)
        out[np.ix_(at, np.flatnonzero(col_ok))] = band[ys[at] - ys[at].min()][:, cols]
    return out, dict(labels.classes)


def _draw_outlines(rgb: np.ndarray, values: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> None:
    """Paint each object's edge (its pixels next to another value), two pixels wide, in its class colour."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    edge = ndimage.binary_dilation(find_boundaries(values, mode="inner")) & (values > 0)
    for value, colour in colours.items():
        rgb[edge & (values == value)] = colour


def _placed(glomeruli, slide: Slide, report: BiopsyReport) -> ClassLabels | AnnotationSet | None:
    """The glomeruli on the slide: as given when already placed (or polygons), else read from their path."""
    if glomeruli is None or isinstance(glomeruli, ClassLabels | AnnotationSet):
        return glomeruli
    output = read_glomeruli(glomeruli)
    if isinstance(output, AnnotationSet):
        return output
    mpp = slide.mpp or report.slide_mpp
    if not mpp:
        raise ReportError(f"{slide.source.name}: its pixel size is unknown; give it (mpp=...)")
    return place(output, slide, mpp, Path(glomeruli).name)


# -- the numbers -------------------------------------------------------------------------------------
def _numbers_table(report: BiopsyReport) -> str:
    rows = "".join(
        f"<tr><th>{_e(LABELS[k])}</th><td>{_cell(v)}</td></tr>"
        for k, v in report.row().items()
        if k not in ("slide", "error")
    )
    return f"<table>{rows}</table>"


def _histogram_png(report: BiopsyReport) -> str:
    """Areas per class, stacked, in the class colours."""
    from matplotlib.figure import Figure

    areas, names = np.asarray(report.glomerulus_areas_um2), report.glomerulus_classes
    figure = Figure(figsize=(6, 2.6), dpi=100)
    axes = figure.subplots()
    classes = list(dict.fromkeys(names))
    bins = np.histogram_bin_edges(areas, bins=min(30, max(5, len(areas) // 2)))
    axes.hist(
        [areas[[n == c for n in names]] for c in classes],
        bins=bins,
        stacked=True,
        color=[np.array(class_color(c)) / 255 for c in classes],
        label=classes,
    )
    axes.set_xlabel("glomerular area (µm²)")
    axes.set_ylabel("glomeruli")
    if len(classes) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _area_list(report: BiopsyReport) -> str:
    rows = "".join(
        f"<tr><td>{i}</td><td>{_e(c)}</td><td>{a:,.0f}</td></tr>"
        for i, (a, c) in enumerate(zip(report.glomerulus_areas_um2, report.glomerulus_classes, strict=True), start=1)
    )
    return (
        f"<details><summary>Each glomerulus ({len(report.glomerulus_areas_um2)})</summary>"
        f"<table><tr><th>#</th><th>class</th><th>area (µm²)</th></tr>{rows}</table></details>"
    )


# -- the cohort index ---------------------------------------------------------------------------------
def _index_html(reports: list[BiopsyReport], folder: Path, pages: dict[str, str]) -> str:
    shown = [c for c in COLUMNS if c not in ("models",)]
    head = "".join(f"<th>{_e(LABELS[c])}</th>" for c in shown)
    body = []
    for report in reports:
        row, tds = report.row(), []
        for column in shown:
            value = row[column]
            if column == "slide" and report.slide in pages:
                link = os.path.relpath(Path(pages[report.slide]).absolute(), folder.absolute())
                tds.append(f'<td><a href="{_e(Path(link).as_posix())}">{_e(value)}</a></td>')
            else:
                tds.append(f"<td>{_cell(value)}</td>")
        body.append(f"<tr{' class=failed' if report.error else ''}>{''.join(tds)}</tr>")
    ok = [r for r in reports if not r.error]
    foot = []
    for label, values in (("total", _totals(ok)), ("mean", _means(ok))):
        tds = "".join(f"<td>{_cell(label if c == 'slide' else values.get(c, ''))}</td>" for c in shown)
        foot.append(f"<tr>{tds}</tr>")
    failed = len(reports) - len(ok)
    summary = f"{len(reports)} slides, {len(ok)} reported" + (f", {failed} failed" if failed else "")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody><tfoot>{''.join(foot)}</tfoot></table>"
    return _page("Cohort report", f"<h1>Cohort report</h1><p>{summary}</p>{table}")


def _totals(reports: list[BiopsyReport]) -> dict:
    out = {}
    for column in SUMMED:
        values = [getattr(r, column) for r in reports if getattr(r, column) is not None]
        if values:
            out[column] = round(sum(values), 4)
    return out


def _means(reports: list[BiopsyReport]) -> dict:
    out = {}
    for column in COLUMNS:
        values = [getattr(r, column) for r in reports]
        values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if values and column not in ("slide_mpp", "glomeruli_mpp"):
            out[column] = round(sum(values) / len(values), 2)
    return out


# -- small helpers -------------------------------------------------------------------------------------
def _target(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.is_dir():
        raise ReportError(f"{out}: is a folder; give a file name to write")
    if not out.parent.is_dir():
        raise ReportError(f"{out}: folder {out.parent} does not exist")
    return out


def _write_text(path: Path, text: str, newline: str | None = None) -> None:
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8", newline=newline)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write it ({exc.strerror or exc})") from None


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _e(value) -> str:
    return html.escape(str(value))
