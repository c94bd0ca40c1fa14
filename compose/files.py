"""Atomic file writes: a file appears complete at its path, or not at all.

Generation results, benchmark records and caches are written to a temporary file in
the same folder, flushed to disk and renamed over the target, so an interrupt, a crash
or a full disk never leaves a torn file where a finished one is expected.

A rename replaces whatever directory entry has the target's name, so the target is
checked first: a new path, or an existing regular file, is written; a symbolic link
to a regular file is written through (the file it points to is replaced, the link
stays); a folder, a device, a FIFO, a socket or a link to any of them is refused with
an :class:`OutputError` naming the path. The temporary file gets the mode a plain
``open`` would give (the user's umask), or the mode of the file it replaces.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


class OutputError(ValueError):
    """An output path compose will not write: the message names the path and why."""


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def write_target(path: str | Path) -> Path:
    """The path a write to ``path`` replaces: ``path`` itself when it is new or a regular
    file, the file a symbolic link points to when that is a regular file. Anything else
    raises :class:`OutputError`."""
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise OutputError(f"{path}: cannot write there: a part of the path above it is a file, not a folder") from None
    if stat.S_ISREG(info.st_mode):
        return path
    if not stat.S_ISLNK(info.st_mode):
        raise OutputError(f"{path}: is {_kind(info.st_mode)}; compose writes only a new file or over a regular file")
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except OSError:
        raise OutputError(f"{path}: is a symbolic link to {target}, which does not exist; compose does not "
                          "create files through links") from None  # fmt: skip
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is a symbolic link to {_kind(mode)} ({target}); compose writes only a new "
                          "file or over a regular file")  # fmt: skip
    return target


def umask() -> int:
    """The process's umask, read without changing it where ``/proc`` says it (setting and
    restoring it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _new_mode(target: Path) -> int:
    """The mode the written file gets: the replaced file's, else ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~umask()


def check_writable(path: str | Path) -> Path:
    """Fail before any work, naming ``path``, when a file could not be written there:
    the target's kind (:func:`write_target`), a read-only file, and a folder that cannot
    be created or written. Returns the path a write would replace."""
    target = write_target(path)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path}: cannot create its folder {folder} ({error.strerror or error})") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{path}: the file is read-only")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"{path}: cannot write in {folder} ({error.strerror or error})") from None
    return target


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing; the content replaces ``path`` only when the block ends
    without an error (``mode`` is ``"wb"`` or ``"w"``). See the module docstring for which
    paths are written and with which file mode."""
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), _new_mode(target))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
