"""Progress of long work, readable on a terminal and in a log file alike.

On a terminal a step shows a tqdm bar. When stderr is a file or a pipe, a bar's carriage returns would fill the log
and glue the next line to the end of the bar, so each step writes one line when it ends instead
(`<step>: 500/500 nuclei in 3.2 s`). `--quiet` (every command; `set_quiet`) writes neither.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """No progress at all, bars or lines, for the rest of this process (the CLIs' `--quiet`)."""
    global _quiet
    _quiet = bool(quiet)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, leave: bool = True):
    """A tqdm bar on a terminal, one closing line in a log, nothing when disabled or quiet. Use it as tqdm:
    iterate over it, or `update(n)` and `close()` (also a context manager). `leave=False`: the bar of an inner step
    disappears when done (its log line stays)."""
    if not enabled or _quiet:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return StepLine(iterable, total=total, desc=desc, unit=unit)


def close_bars() -> None:
    """End every open bar's line, so that what is printed next (an error) starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class StepLine:
    """tqdm's counting API without a bar: one line on stderr when the step ends (its iteration finishes, or
    `close()`: on errors too, so a log shows how far a failed step got)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.closed = total, 0, False
        self.started = time.perf_counter()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        seconds = time.perf_counter() - self.started
        print(f"{self.desc}: {done} {self.unit} in {seconds:.1f} s", file=sys.stderr, flush=True)

    def __enter__(self) -> "StepLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
