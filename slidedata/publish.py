"""Put a written file or folder under its final name only once it is complete: the one way every writer here does it.

    with publishing(path, validate=check) as tmp:      # a file: CSV, Parquet, .h5ad, joblib, JSON, PNG
        write_to(tmp)
    with publishing_folder(path) as tmp:                # a folder: a sample zarr, a zarr group, a table element
        write_folder_at(tmp)

While being written, the output is `.<name>.partial-<host>-<pid><suffix>` (a file: the suffix stays, the libraries
go by it) or `.<name>.partial-<host>-<pid>` (a folder: no `.zarr` at the end, so that nothing takes it for a sample)
beside the final path. When the block ends normally, `validate(tmp)` (if given) lists the output's problems: with
any, the temporary output is deleted, the final path left as it was, and `error(path, problems)` raised. Otherwise:

* a file is moved over the final path with `os.replace` (one atomic step);
* a folder, which cannot be renamed over a non-empty one, is swapped with the old one in one atomic step where the
  system can (Linux `renameat2(RENAME_EXCHANGE)`); elsewhere the old folder is renamed aside to
  `.<name>.replaced-<host>-<pid>`, the new one renamed in, and the old one deleted.

An exception in the block (or in `validate`) deletes the temporary output and leaves the final path as it was.
SIGTERM raises SystemExit inside the block, so that this cleanup runs too (in the main thread, where SIGTERM has its
default action: elsewhere a process cannot set signal handlers, or handles SIGTERM its own way); during the renames
it waits until they are done. SIGKILL runs nothing: what a killed writer leaves carries its pid, and the next
publish of the same path on the same host (or `sweep(path)`) removes it once that pid is gone; another host's
leftovers are never judged from here.

What a reader of the final path can observe, whatever happens to the writer: the previous version (or nothing, if
there was none) until the rename, then the new one complete; never a part of either. The one exception is the
fallback folder swap: between its two renames the path is briefly absent, and a writer killed exactly there leaves it
absent, with the old folder under `.<name>.replaced-<host>-<pid>`; `sweep` (run by the next publish of that path)
puts it back. A writer killed after the swap, while deleting the old folder, leaves that folder behind under its temporary
name; `sweep` deletes it. Several files published one after the other are each whole, not together: a writer
killed between two of them leaves some new and some old.

Before any work, a stage checks where its outputs go with `check_writable(path)`: a location this process cannot
write (a path through a file, a read-only mount, /proc) is a `NotWritable` DataError then, not an OSError at the
end of an hour's work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from slidedata.errors import DataError
from slidedata.locks import pid_alive

PARTIAL_MARK = ".partial-"
ASIDE_MARK = ".replaced-"
NAME_MAX = 255  # bytes in one file or folder name: Linux's ext4, XFS, btrfs, tmpfs; macOS's APFS; NTFS (characters)
MAX_SUFFIX = 16

Validate = Callable[[Path], list]


class NotPublished(Exception):
    """The written output failed its check; it was deleted, the final path left as it was."""

    def __init__(self, path: Path, problems: list):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: {len(problems)} problem(s), not written: " + "; ".join(map(str, problems)))


def writer_tag(pid: int | None = None) -> str:
    """'<host>-<pid>' of a writer: on a shared file system (several machines embedding into one cache) a pid alone
    names no process, and `sweep` may only judge the writers of its own host."""
    return f"{socket.gethostname()}-{pid or os.getpid()}"


class NotWritable(DataError):
    """An output location that cannot be written: found before any work, not after it."""


# "No space left on device" and "Disk quota exceeded": the disk is full for this writer either way.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def check_writable(target: str | Path, folder: bool = True, into_sample: bool = False) -> Path:
    """Refuse, before any work, an output location this process cannot write; returns `target` as a Path.

    `folder`: `target` is a folder to write into (created if missing), else a file (its folder is checked, and a
    folder in its place refused). The nearest existing folder on the way to it must accept a new file: a probe file
    is created there and removed at once, because permission bits say nothing for root, and root still cannot write
    on a read-only mount, in /proc or /sys, or under a path that runs through a file. Nothing else is created.
    A location inside a sample zarr is refused too (a cache or a model there would be taken for part of the input),
    unless `into_sample` (the tables that `submit --into-spatialdata` adds to a sample).
    """
    target = Path(target)
    too_long = [part for part in target.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise NotWritable(target, "-", f"a name of {len(os.fsencode(too_long[0]))} bytes is longer than file systems "
                                       f"allow ({NAME_MAX}): shorten '{too_long[0][:40]}...'")
    sample = None if into_sample else sample_holding(target)
    if sample is not None:
        raise NotWritable(target, "-", f"lies inside the sample zarr {sample}: write outputs beside the samples, "
                                       "not into one")
    if folder and target.exists() and not target.is_dir():
        raise NotWritable(target, "-", "is an existing file, not a folder: give a folder for this output")
    if not folder and target.is_dir():
        raise NotWritable(target, "-", "is an existing folder: give a file name for this output")
    existing = target if folder else target.parent
    while not existing.exists() and existing != existing.parent:  # the folders that the writer will create
        if os.path.lexists(existing):
            raise NotWritable(target, "-", f"{existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritable(target, "-", f"cannot be made: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".writable-{os.getpid()}-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == target else f" (in {existing}, the nearest existing folder)"
        raise NotWritable(target, "-", f"cannot write here{where}: {exc.strerror or exc}") from None
    return target


def sample_holding(path: str | Path) -> Path | None:
    """The sample zarr that `path` is, or lies inside, if any: a zarr group with SpatialData's element folders
    (the sample format's one check that needs no reading, kept here so that this module stays light).
    An output written there (a feature cache, a model) would be taken for part of the input."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if is_zarr_group(folder) and any(
                (folder / kind).is_dir() for kind in ("images", "labels", "tables")):
            return folder
    return None


def partial_path(target: Path, folder: bool = False, pid: int | None = None) -> Path:
    """The temporary name of `target` while process `pid` (default: this one) of this host writes it."""
    suffix = "" if folder else _kept_suffix(target)
    return target.with_name(f".{_stem_of(target)}{PARTIAL_MARK}{writer_tag(pid)}{suffix}")


def aside_path(target: Path, pid: int | None = None) -> Path:
    """Where the fallback folder swap keeps the old folder between its two renames."""
    return target.with_name(f".{_stem_of(target)}{ASIDE_MARK}{writer_tag(pid)}")


def _stem_of(target: Path) -> str:
    """`target`'s name as its temporary names begin with it: the whole name where the longest temporary name (the
    widest mark, a 7-digit pid, the suffix) stays within the file system's limit on one name; else the name cut
    short, on a whole character, with a hash of the whole so that two long names sharing their start do not share
    temporary names."""
    name = os.fsencode(target.name)
    mark = f".{max(PARTIAL_MARK, ASIDE_MARK, key=len)}{writer_tag(9_999_999)}"
    room = NAME_MAX - len(os.fsencode(mark + _kept_suffix(target)))
    if len(name) <= room:
        return target.name
    digest = hashlib.sha256(name).hexdigest()[:12]
    return name[: room - len(digest) - 1].decode("utf-8", "ignore") + "~" + digest


def _kept_suffix(target: Path) -> str:
    """The suffix a temporary file keeps (the libraries go by it): a short one (`.csv`, `.parquet`), not the tail of
    a name whose only dot comes early."""
    return target.suffix if len(target.suffix) <= MAX_SUFFIX else ""


@contextlib.contextmanager
def publishing(target: str | Path, validate: Validate | None = None,
               error: Callable[[Path, list], Exception] = NotPublished) -> Iterator[Path]:
    """Yield the temporary path to write the file `target` at; publish it when the block ends (module docstring)."""
    with _publishing(Path(target), False, validate, error, keep_existing=False) as tmp:
        yield tmp


@contextlib.contextmanager
def publishing_folder(target: str | Path, validate: Validate | None = None,
                      error: Callable[[Path, list], Exception] = NotPublished,
                      keep_existing: bool = False) -> Iterator[Path]:
    """Yield the temporary path (not created) to build the folder `target` at; swap it in when the block ends.

    `keep_existing`: if `target` exists by then (another worker published the same content first), keep it and
    delete ours, instead of replacing it.
    """
    with _publishing(Path(target), True, validate, error, keep_existing) as tmp:
        yield tmp


def sweep(target: str | Path) -> list[Path]:
    """Clean up after writers of `target` that are gone; returns the paths removed or restored.

    A folder set aside by a writer killed between the two renames of the fallback swap goes back to `target` when
    `target` is missing (the newest such folder, if several), and is deleted otherwise; temporary outputs are
    deleted, and so are the fixed temporary names of older versions (`.<name>.tmp`, `.<name>.tmp<pid>`,
    `<name>.tmp`). Outputs of live processes are left alone (and so are those of a dead one whose pid another
    process has taken since, until that one ends too).
    """
    target = Path(target)
    ours = re.compile(re.escape(f".{_stem_of(target)}") + f"({re.escape(PARTIAL_MARK)}|{re.escape(ASIDE_MARK)})"
                      + re.escape(socket.gethostname()) + r"-(\d+)(" + re.escape(_kept_suffix(target)) + ")?$")
    legacy = re.compile(r"\.?" + re.escape(f"{target.name}.tmp") + r"(\d*)$")
    name, stem = glob.escape(target.name), glob.escape(_stem_of(target))
    asides, leftovers = [], []
    candidates = {*target.parent.glob(f".{name}.*"), *target.parent.glob(f".{stem}.*")}
    if len(os.fsencode(target.name)) + len(".tmp") <= NAME_MAX:  # older versions' names, where they could exist
        candidates.update(target.parent.glob(f"{name}.tmp"))
    for candidate in candidates:
        match, old = ours.match(candidate.name), legacy.match(candidate.name)
        if match and int(match.group(2)) != os.getpid() and not pid_alive(int(match.group(2))):
            (asides if match.group(1) == ASIDE_MARK else leftovers).append(candidate)
        elif old and (not old.group(1) or not pid_alive(int(old.group(1)))):
            leftovers.append(candidate)
    asides.sort(key=_mtime, reverse=True)
    swept = asides + leftovers
    if asides and not os.path.lexists(target):
        with contextlib.suppress(OSError):  # another process sweeping at the same moment put one back first
            os.rename(asides.pop(0), target)
    for path in asides + leftovers:
        _remove(path)
    return swept


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM ends Python without running `finally` blocks; inside this block it raises SystemExit instead, so the
    temporary output is removed. (Only the main thread can set signal handlers; elsewhere this does nothing. A
    program that handles or ignores SIGTERM itself keeps its own handling.)"""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _publishing(target: Path, folder: bool, validate: Validate | None, error, keep_existing: bool
                ) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = partial_path(target, folder)
    _remove(tmp)  # left by an earlier process that had our pid (a restarted container reuses them)
    with sigterm_raises():
        try:
            yield tmp
            if not os.path.lexists(tmp):
                raise FileNotFoundError(f"nothing was written at {tmp} to publish as {target}")
            problems = list(validate(tmp)) if validate is not None else []
            if problems:
                raise error(target, problems)
            with _sigterm_deferred():
                _put_in_place(tmp, target, folder, keep_existing)
        finally:
            _settle(target)
            _remove(tmp)  # ours on failure; the old folder after a swap; ours again when theirs was kept


def _put_in_place(tmp: Path, target: Path, folder: bool, keep_existing: bool) -> None:
    if not folder and not keep_existing:
        os.replace(tmp, target)
        return
    try:
        # A first version; refused (atomically) where a folder or file is there already, except an empty folder.
        os.link(tmp, target) if not folder else os.rename(tmp, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if keep_existing:
        return
    if _exchange(tmp, target):  # `tmp` now holds the old folder
        return
    aside = aside_path(target)
    os.rename(target, aside)
    os.rename(tmp, target)  # killed before this line: `target` is missing until `sweep` puts `aside` back


def _settle(target: Path) -> None:
    """After this process's fallback swap: delete the old folder, or put it back if the new one never arrived."""
    aside = aside_path(target)
    if os.path.lexists(aside):
        if os.path.lexists(target):
            _remove(aside)
        else:
            os.rename(aside, target)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back during the renames (it is delivered when they are done): they are short, and a swap
    stopped halfway would leave the folder missing."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system or the file system cannot (then nothing changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def is_zarr_group(folder: Path) -> bool:
    """`folder` is a zarr group, format 3 or 2 (by its metadata file alone: nothing is read)."""
    return (folder / "zarr.json").is_file() or (folder / ".zgroup").is_file()
