"""Running per-sample tasks: one at a time in this process, or unchanged on an existing Dask cluster."""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm


def compute(tasks: list, scheduler: str | None, desc: str, progress: bool = True,
            each: Callable | None = None) -> list:
    """Results of dask.delayed `tasks`, in order: one at a time in this process (memory of one sample), or on the
    `dask.distributed` cluster at `scheduler` (an address such as tcp://host:8786).

    `each(result)`, when given, sees every result as soon as it is computed, and what it returns is kept instead.
    """
    each = each or (lambda result: result)
    if scheduler is None:
        return [each(task.compute(scheduler="synchronous"))
                for task in tqdm(tasks, desc=desc, unit="sample", disable=not progress)]
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        futures = client.compute(tasks)
        results = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="sample",
                           disable=not progress):
            results[future.key] = each(future.result())
            future.release()
        return [results[future.key] for future in futures]
