"""One writer per output: a lock that two runs on the same file cannot both hold.

Two `nephro segment --overwrite` runs on one output shared its partial store, and
one deleted the other's live files. The lock is an advisory `flock` on a hidden
file beside the output, so the kernel releases it when its owner dies (a killed
run never leaves a stale lock), and the file is removed when the run ends. The
owner's pid is written in it, so the refusal can name who holds it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second writer
    fcntl = None  # type: ignore[assignment]


RETRY_SECONDS = 0.3  # how long a starting run waits for a lock held for a moment


class Locked(Exception):
    """Another live process holds the lock."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(f"{path}: another nephro run ({owner}) is writing it; wait for it to end, or stop it first")
        self.path, self.owner = path, owner


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def exclusive(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of `out` for the block; raise `Locked` at once if another process holds it."""
    out = Path(out)
    if fcntl is None:
        yield
        return
    path = lock_path(out)
    while True:
        fd = _open(path)
        try:
            _lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise Locked(out, _owner(path)) from None
        except OSError as exc:  # a filesystem without flock (some network mounts): go on, unprotected
            os.close(fd)
            warnings.warn(
                f"{out}: cannot lock it on this filesystem ({exc.strerror}); make sure no other run writes it",
                RuntimeWarning,
                stacklevel=3,
            )
            yield
            return
        # The holder before us may have removed the file after we opened it: then we lock a
        # file nobody else will find, and must start again on the one at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # opened read-only: another user's file; the lock is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it, so nobody locks the removed file and thinks it is theirs
        os.close(fd)


def _open(path: Path) -> int:
    """The lock file, made writable for everyone the umask allows (a stale one may be another user's)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor


def _lock(fd: int) -> None:
    """An exclusive lock, retried briefly: `holder` of another starting run holds it shared for an instant."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def holder(out: str | os.PathLike[str]) -> str | None:
    """Who holds the lock of `out` now ("pid N"), or None: for refusing early, before any work."""
    path = lock_path(Path(out))
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner(path)
    except OSError:  # no flock here: `exclusive` says so when the run starts
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"
