"""Writing a file or folder so that nobody ever sees half of it.

Everything the project writes (annotations, label images, tile datasets,
checkpoints, the sample slide) goes to a temporary name beside the target and is
renamed into place only when complete; an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to (as a file or a folder); move it to `path` on success.

    An existing `path` is replaced: callers decide beforehand whether that is allowed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        _move_into_place(tmp, path)
    finally:
        _remove(tmp)


def _move_into_place(tmp: Path, path: Path) -> None:
    if not (path.exists() and (path.is_dir() or tmp.is_dir())):
        os.replace(tmp, path)  # atomic, and a file replaces a file in one step
        return
    old = path.with_name(f".{path.name}.{os.getpid()}.old")  # a folder cannot be replaced in one step
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    finally:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
