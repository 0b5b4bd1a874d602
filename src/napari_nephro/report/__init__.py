"""Per-biopsy reports from the results: a CSV row and an HTML page per slide, a CSV and an index per cohort.

The numbers are what a renal pathologist writes down (tissue area, glomeruli and
their sclerosis, glomerular areas, nuclei density inside and outside glomeruli).
Outputs are read at whatever scale they were written; a glomerulus is a connected piece of
one class, as the run's summary and the GeoJSON export count them. The tissue area fills
the section's holes (lumens, vessels), so it is larger than the tissue share the engine
gives its tiles. Nothing here imports napari.
"""

from .core import COLUMNS, BiopsyReport, biopsy_report, report_from_arrays, report_from_polygons
from .errors import ReportError
from .inputs import ClassLabels, Tissue, place, read_glomeruli, read_nuclei, tissue, tissue_area_um2, tissue_map
from .page import csv_text, write_biopsy_html, write_cohort, write_report_csv

__all__ = [
    "COLUMNS",
    "BiopsyReport",
    "ClassLabels",
    "ReportError",
    "Tissue",
    "biopsy_report",
    "csv_text",
    "place",
    "read_glomeruli",
    "read_nuclei",
    "report_from_arrays",
    "report_from_polygons",
    "tissue",
    "tissue_area_um2",
    "tissue_map",
    "write_biopsy_html",
    "write_cohort",
    "write_report_csv",
]
