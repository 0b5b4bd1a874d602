"""Reading a JSON file a user gave us: its data, or one line naming the file and what is wrong with it.

Every way a file can fail to be JSON ends in the same kind of one-line error: a
missing file, a folder, no permission, bytes that are not UTF-8 text, a syntax
error (with its line and column), a number too long to convert, and nesting so
deep that Python's parser gives up (`"[" * 200000`), which is a RecursionError
and would otherwise be a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class JSONFileError(ValueError):
    """A file that cannot be read as JSON; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path, self.reason = str(path), " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


def read_json(
    path: str | os.PathLike[str],
    *,
    max_depth: int | None = None,
    error: Callable[[str], Exception] | None = None,
) -> Any:
    """The parsed content of a JSON file (UTF-8, a byte-order mark allowed).

    `max_depth` also refuses data nested deeper than that many lists and objects
    (counted without recursion), for callers that walk or copy the data recursively.
    Failures raise `JSONFileError(path, reason)`, or `error(message)` when given
    (e.g. `error=ModelError`), the message being `"<path>: <reason>"`.
    """
    reason = None
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "is a folder, not a JSON file"
    except PermissionError:
        reason = "cannot be read (permission denied)"
    except UnicodeDecodeError as exc:
        reason = f"not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at position {exc.start}), so not JSON"
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    except RecursionError:
        reason = "not valid JSON: lists or objects nested too deeply to read (more levels than Python allows)"
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        reason = f"not valid JSON ({exc})"
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror or exc.__class__.__name__})"
    if reason is None and max_depth is not None and nesting_exceeds(data, max_depth):
        reason = f"JSON nested more than {max_depth} levels deep"
    if reason is not None:
        raise JSONFileError(path, reason) if error is None else error(f"{Path(path)}: {reason}")
    return data


def nesting_exceeds(data: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels (counted without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
