"""Running per-sample tasks: one at a time in this process, or unchanged on an existing Dask cluster."""

from __future__ import annotations

from tqdm.auto import tqdm


def compute(tasks: list, scheduler: str | None, desc: str, progress: bool = True) -> list:
    """Results of dask.delayed `tasks`: one at a time in this process (memory of one sample), or on the
    `dask.distributed` cluster at `scheduler` (an address such as tcp://host:8786)."""
    if scheduler is None:
        return [task.compute(scheduler="synchronous")
                for task in tqdm(tasks, desc=desc, unit="sample", disable=not progress)]
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        futures = client.compute(tasks)
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="sample", disable=not progress):
            pass
        return client.gather(futures)
