"""Write the challenge's long table (cell_id, gene, prediction, sample) in bounded chunks, atomically.

10^5 nuclei x 460 genes is 4.6e7 rows: each chunk of nuclei becomes one block of rows (CSV text or a Parquet row
group), so memory stays at one block. The file appears under its final name only once complete and checked.

While being written it is `.<name>.partial-<pid><suffix>` beside the final path: removed on errors and on SIGTERM,
and recognisable afterwards (a SIGKILL runs no cleanup), so the next run removes those of processes that are gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from submission.predict import DECIMALS, SamplePredictions

COLUMNS = ["cell_id", "gene", "prediction", "sample"]
PARTIAL_MARK = ".partial-"


class InvalidSubmission(Exception):
    """The written file failed its check; it was not put in place."""

    def __init__(self, path: Path, problems: list):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: {len(problems)} problem(s), file not written: " + "; ".join(map(str, problems)))


def partial_path(path: Path) -> Path:
    """The temporary name of `path` while this process writes it (same suffix: the readers go by it)."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}{path.suffix}")


def remove_abandoned_partials(path: Path) -> list[Path]:
    """Delete the temporary files of `path` left by killed writers (dead pids; older versions' `.name.tmp`)."""
    from slidedata.locks import pid_alive

    pattern = re.compile(re.escape(f".{path.name}{PARTIAL_MARK}") + r"(\d+)" + re.escape(path.suffix) + "$")
    removed = []
    for candidate in path.parent.glob(f".{path.name}*"):
        match = pattern.match(candidate.name)
        if (match and not pid_alive(int(match.group(1)))) or candidate.name == f".{path.name}.tmp":
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM ends Python without running `finally` blocks; inside this block it raises SystemExit instead, so the
    temporary file is removed. (Only the main thread can set signal handlers; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def long_blocks(predictions: SamplePredictions, nuclei_per_block: int = 20000) -> Iterator[pd.DataFrame]:
    """The long format of one sample, `nuclei_per_block` nuclei (x genes rows) at a time."""
    genes = pd.Categorical(predictions.genes, categories=predictions.genes)
    n_genes = len(predictions.genes)
    for start in range(0, len(predictions.cell_ids), nuclei_per_block):
        ids = predictions.cell_ids[start: start + nuclei_per_block]
        values = predictions.values[start: start + nuclei_per_block]
        yield pd.DataFrame({
            "cell_id": np.repeat(ids, n_genes),
            "gene": pd.Categorical.from_codes(np.tile(np.arange(n_genes), len(ids)), categories=genes.categories),
            "prediction": values.reshape(-1).astype(np.float64).round(DECIMALS),
            "sample": predictions.sample,
        })


def write_submission(predictions: Iterable[SamplePredictions], path: str | Path, nuclei_per_block: int = 20000,
                     check: Callable[[Path], list] | None = None) -> Path:
    """CSV (default) or Parquet (by suffix) with exactly the 4 columns; returns the final path.

    `check(temporary_path)` returns the file's problems; if there are any, the file is deleted instead of renamed
    into place and InvalidSubmission is raised (a previous file at `path` is left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(path)
    tmp = partial_path(path)
    with sigterm_raises():
        _write_checked(predictions, path, tmp, nuclei_per_block, check)
    return path


def _write_checked(predictions: Iterable[SamplePredictions], path: Path, tmp: Path, nuclei_per_block: int,
                   check: Callable[[Path], list] | None) -> None:
    parquet = path.suffix == ".parquet"
    writer = None
    try:
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("cell_id", pa.int64()), ("gene", pa.string()), ("prediction", pa.float64()),
                                ("sample", pa.string())])
            writer = pq.ParquetWriter(tmp, schema)
        else:
            with open(tmp, "w") as handle:
                handle.write(",".join(COLUMNS) + "\n")
        for sample_predictions in predictions:
            for block in long_blocks(sample_predictions, nuclei_per_block):
                if parquet:
                    block = block.astype({"gene": str})
                    writer.write_table(pa.Table.from_pandas(block, schema=schema, preserve_index=False))
                else:
                    block.to_csv(tmp, mode="a", header=False, index=False, float_format=f"%.{DECIMALS}f")
        if writer is not None:
            writer.close()
            writer = None
        problems = check(tmp) if check is not None else []
        if problems:
            raise InvalidSubmission(path, problems)
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)


def read_submission_blocks(path: str | Path, rows_per_block: int = 5_000_000) -> Iterator[pd.DataFrame]:
    """Stream a submission file back, CSV or Parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_block):
            yield batch.to_pandas()
    else:
        yield from pd.read_csv(path, chunksize=rows_per_block, dtype={"gene": str, "sample": str})
