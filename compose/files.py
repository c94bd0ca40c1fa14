"""Atomic file writes: a file appears complete at its path, or not at all.

Generation results, benchmark records and caches are written to a temporary file in
the same folder, flushed to disk and renamed over the target, so an interrupt, a crash
or a full disk never leaves a torn file where a finished one is expected.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing; the content replaces ``path`` only when the block ends
    without an error (``mode`` is ``"wb"`` or ``"w"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
