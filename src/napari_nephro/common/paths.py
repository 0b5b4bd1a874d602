"""Why a path a user gave cannot be opened, in words: shared by slides, annotations and pipelines."""

from __future__ import annotations

import errno
import os


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be opened at all, in words (None when it exists).

    `Path.exists()` is False for a symbolic link loop as for a missing file, so a loop
    would read as "no such file"; `os.stat` tells them apart (ELOOP). Other failures
    (no permission on a folder above it, a dead network share) are the system's words.
    """
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (a link that points, in the end, back to itself)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "no such file or directory"
        return exc.strerror or str(exc)
    except ValueError as exc:  # a NUL byte in the name
        return f"is not a valid path ({exc})"
    return None
