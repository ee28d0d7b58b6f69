"""Lock files that let independent processes (two `python -m embed` on one cache) share work instead of repeating it.

A lock is a file created with O_CREAT | O_EXCL (atomic, also on NFS v3+), holding the owner's pid, host and process
start time. A process that died leaves its lock behind: a lock of a dead pid on this host, of a pid now owned by
another process (containers restart with the same pid and host: a killed run's lock would otherwise look alive
forever), or older than `STALE_AFTER_S` from another host, is reclaimed. Reclaiming has a narrow race (two processes reclaiming one stale lock at once may both get it);
its only cost is computing one unit twice, which writes the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

STALE_AFTER_S = 3600.0  # a lock from another host is trusted this long (its pid cannot be checked from here)
POLL_S = 0.2


def try_lock(path: Path, owner_pid: int | None = None) -> bool:
    """Create the lock at `path` for `owner_pid` (default: this process); False if a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _reclaim_if_stale(path):
                return False
            continue
        pid = owner_pid or os.getpid()
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{pid} {socket.gethostname()} {time.time():.0f} {process_start(pid)}\n")
        return True
    return False


def release(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def holder(path: Path) -> str | None:
    """'pid N on HOST' of the lock's owner, None if unlocked."""
    try:
        pid, host, *_ = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return f"pid {pid} on {host}"


def is_held(path: Path) -> bool:
    """True if a live process holds the lock (a stale lock is removed on the way)."""
    return path.exists() and not _reclaim_if_stale(path)


@contextlib.contextmanager
def hold(path: Path, poll_s: float = POLL_S):
    """Wait for the lock, hold it for the block, release it (also on errors)."""
    while not try_lock(path):
        time.sleep(poll_s)
    try:
        yield
    finally:
        release(path)


def _reclaim_if_stale(path: Path) -> bool:
    """Remove a lock whose owner is gone; True if the caller may try again."""
    try:
        text = path.read_text().split()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True  # released meanwhile
    stale = age > STALE_AFTER_S
    if len(text) >= 2 and text[1] == socket.gethostname() and text[0].isdigit():
        pid = int(text[0])
        recorded = text[3] if len(text) >= 4 else "?"
        stale = not pid_alive(pid) or (recorded != "?" and process_start(pid) not in ("?", recorded))
    elif len(text) < 2:  # a lock still being written by its creator, or garbage: trust it only briefly
        stale = age > 10
    if stale:
        release(path)
    return stale


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), '?' where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
