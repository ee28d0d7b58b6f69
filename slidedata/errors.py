"""The one error type for bad input: it always names the file and the element at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Input data that the pipeline cannot use, with the file, the element and the problem."""

    def __init__(self, path: str | Path, element: str, problem: str):
        self.path, self.element, self.problem = Path(path), element, problem
        where = f"{path}" if element in ("", "-") else f"{path} [{element}]"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable with its fields: it crosses process boundaries (DataLoader and Dask workers)
        return type(self), (self.path, self.element, self.problem)
