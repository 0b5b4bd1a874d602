"""Writing a file or folder so that nobody ever sees half of it.

Everything the project writes (annotations, label images, tile datasets,
checkpoints, the sample slide) goes to a temporary name beside the target and is
renamed into place only when complete; an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to (as a file or a folder); move it to `path` on success.

    An existing `path` is replaced: callers decide beforehand whether that is allowed.
    """
    path = Path(path)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.{_tag()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        _move_into_place(tmp, path)
    finally:
        _remove(tmp)


def clean_stale(path: Path) -> None:
    """Remove what writers of `path` killed mid-write left beside it (`.NAME.HOST-PID.tmp` of dead processes).

    A kill between moving the old folder aside and the new one in leaves the old one
    as `.NAME.HOST-PID.old` and nothing at `path`: it is put back, not removed. Files
    of another host (a shared folder) are left alone: its processes cannot be seen here.
    """
    prefix = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for other in siblings:
        name = other.name
        if not name.startswith(prefix) or not name.endswith((".tmp", ".old")):
            continue
        host, _, pid = name[len(prefix) : -4].rpartition("-")
        if not pid.isdigit() or (host and host != _host()) or _alive(int(pid)):
            continue
        if name.endswith(".old") and not path.exists():
            os.replace(other, path)
        else:
            _remove(other)


def _tag() -> str:
    """Who writes a temporary file: this host and process."""
    return f"{_host()}-{os.getpid()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would end the process: keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's live process; a pid no process has
        return True
    return True


def _move_into_place(tmp: Path, path: Path) -> None:
    if not (path.exists() and (path.is_dir() or tmp.is_dir())):
        os.replace(tmp, path)  # atomic, and a file replaces a file in one step
        return
    old = path.with_name(f".{path.name}.{_tag()}.old")  # a folder cannot be replaced in one step
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
