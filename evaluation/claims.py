"""Claim files: benchmark processes started by hand on one ``--out`` folder split its items.

``torchrun`` and ``accelerate launch`` give each rank its share of the items; processes
started by hand know nothing of each other, and would each compute every item. So an
item is claimed before it runs: a file created with ``O_CREAT | O_EXCL`` beside the
item's record, which exactly one process can create. K processes then split the work
as K ranks do, and each waits at the end until every item is done, by it or another.

A claim records the process id and host that hold it. A claim whose process is gone
(kill -9, a crash) is taken over, so it never blocks an item forever; a process that
stops by an exception, Ctrl+C or SIGTERM releases its claims on the way out. A claim
held on another host cannot be checked and is waited for. Records are written
atomically whatever happens, so the rare race left (two processes judging one claim
stale at once) costs at most an item computed twice, never a torn or wrong record.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
HOST = socket.gethostname()
POLL_SECONDS = 0.5
UNWRITTEN_SECONDS = 60.0
"""A claim still empty after this long was left by a process killed while creating it."""
_held: set[Path] = set()


def claim(path: Path) -> bool:
    """Create the claim file ``path`` for this process: ``True`` when it now holds it,
    ``False`` when a live process does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or not _gone(path, holder) or not _clear(path, holder):
                return False
            continue
        with os.fdopen(handle, "w") as file:
            json.dump({"pid": os.getpid(), "host": HOST, "nonce": uuid.uuid4().hex}, file)
        _held.add(path)
        return True
    return False


def release(path: Path) -> None:
    """Give up a claim this process holds (its item is done, or the process stops)."""
    if path in _held:
        _held.discard(path)
        path.unlink(missing_ok=True)


def release_all() -> None:
    for path in list(_held):
        release(path)


def _holder(path: Path) -> dict | None:
    """What a claim says of its holder: ``{}`` while it is being written (or was left empty
    by a process killed right after creating it), ``None`` once it is gone."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"unwritten": age > UNWRITTEN_SECONDS}


def _gone(path: Path, holder: dict) -> bool:
    """Whether the process that holds a claim is gone: it ran on this host and no such
    process lives (or it is a zombie), or it is this process's pid on a claim it does not
    hold (a pid reused), or the claim was left unwritten."""
    if "unwritten" in holder:
        return holder["unwritten"]
    if holder.get("host") != HOST or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    if pid == os.getpid():
        return path not in _held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped still answers ``kill(pid, 0)``."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _clear(path: Path, holder: dict) -> bool:
    """Move a stale claim out of the way, atomically; ``False`` when what was moved is a
    fresh claim another process took meanwhile (it is put back)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    moved = _holder(aside)
    if moved != holder and "unwritten" not in holder:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def share(items: Iterable[T], done: Callable[[T], bool], claim_of: Callable[[T], Path], run: Callable[[T], None],
          tick: Callable[[], None] = lambda: None) -> int:  # fmt: skip
    """Run each item that is not ``done`` and that this process can claim; wait for the
    items other processes hold, taking over those whose process is gone; return once
    every item is done, with how many this process ran. ``tick`` is called once per item
    as it is found done."""
    waiting, ran = list(items), 0
    try:
        while waiting:
            left = []
            for item in waiting:
                if not done(item) and claim(claim_of(item)):
                    try:
                        if not done(item):  # another process may have finished it just before
                            run(item)
                            ran += 1
                    finally:
                        release(claim_of(item))
                if done(item):
                    tick()
                else:
                    left.append(item)
            if len(left) == len(waiting):
                time.sleep(POLL_SECONDS)
            waiting = left
    finally:
        release_all()
    return ran
