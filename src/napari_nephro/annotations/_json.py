"""Loading an annotation JSON file once, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AnnotationError


def load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise AnnotationError(path, "no such file") from None
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise AnnotationError(path, f"not a JSON text file ({exc.__class__.__name__})") from None


def is_coco(data) -> bool:
    return isinstance(data, dict) and {"images", "annotations", "categories"} <= data.keys()
