"""Running per-sample tasks: one at a time in this process, or unchanged on an existing Dask cluster."""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

from slidedata.progress import progress_bar

# Seconds to reach the scheduler: a live one answers at once; dask's own 30 s default only delays the error.
CONNECT_TIMEOUT_S = 5
# Arguments sent to the cluster as they are (in the task graph); anything else is scattered to the workers first.
_INLINE = (type(None), bool, int, float, str)


class SchedulerUnreachable(ConnectionError):
    """The dask.distributed scheduler given (`--scheduler`) is not an address, or nothing answers there."""


def compute(function: Callable, calls: list[tuple], scheduler: str | None, desc: str, progress: bool = True,
            each: Callable | None = None) -> list:
    """`[function(*args) for args in calls]`: one at a time in this process (memory of one sample), or on the
    `dask.distributed` cluster at `scheduler` (an address such as tcp://host:8786).

    `each(result)`, when given, sees every result as soon as it is computed, and what it returns is kept instead
    (a result can hand over its bulk and keep its summary).

    On a cluster, every argument but plain numbers and strings (the source, fitted models, sample descriptions) is
    scattered to the workers once, however many calls share it, and the tasks carry only its key: the graph stays
    small whatever the arguments weigh (a source with the principal axes of wide blocks, ridge coefficients of every
    split), so dask never sends a large graph, and no argument travels twice.
    """
    each = each or (lambda result: result)
    if scheduler is None:
        return [each(function(*args)) for args in progress_bar(calls, desc=desc, unit="sample", enabled=progress)]
    from distributed import as_completed

    with client_of(scheduler) as client:
        shared: dict[int, object] = {}
        for args in calls:
            for arg in args:
                if not isinstance(arg, _INLINE):
                    shared.setdefault(id(arg), arg)
        futures_of = dict(zip(shared, client.scatter(list(shared.values()), hash=False))) if shared else {}
        futures = [client.submit(function, *[futures_of.get(id(a), a) for a in args], pure=False) for args in calls]
        results = {}
        done = as_completed(futures, loop=client.loop)  # this client's loop: it is not dask's default client
        for future in progress_bar(done, total=len(futures), desc=desc, unit="sample", enabled=progress):
            results[future.key] = each(future.result())
            future.release()
        return [results[future.key] for future in futures]


@contextlib.contextmanager
def client_of(scheduler: str) -> Iterator:
    """A client of the scheduler at `scheduler`; SchedulerUnreachable (one line) if it cannot be reached."""
    from distributed import Client

    # Not dask's default scheduler: distributed makes a client the default as it starts, and one that then failed
    # to connect stayed the default of every later computation in this process until garbage-collected.
    failure = None
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        failure = _reason(exc)
    if failure is not None:
        # The half-made client is garbage in a reference cycle. Collected here, its __del__ closes it now; left to
        # chance, it ran inside the start of a later client or cluster, whose event-loop lock (one for all of
        # distributed's loop runners) its close waits for: the process hung.
        gc.collect()
        raise SchedulerUnreachable(f"dask scheduler {scheduler!r}: {failure} (give the address of a running "
                                   "dask.distributed scheduler, e.g. tcp://host:8786, or leave out --scheduler to "
                                   "compute here)")
    with client:
        yield client


def check_scheduler(scheduler: str | None) -> None:
    """Connect once, before any work, so an unreachable scheduler is reported in seconds, not after reading data."""
    if scheduler is not None:
        with client_of(scheduler):
            pass


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, ValueError):
        return f"not an address ({text[0] if text else type(exc).__name__})"
    return f"nothing answers there ({text[0] if text else type(exc).__name__})"
