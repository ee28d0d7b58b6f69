"""Write the challenge's long table (cell_id, gene, prediction, sample) in bounded chunks, atomically.

10^5 nuclei x 460 genes is 4.6e7 rows: each chunk of nuclei becomes one block of rows (CSV text or a Parquet row
group), so memory stays at one block. The file appears under its final name only once complete and checked
(`slidedata.publish`): while being written it is `.<name>.partial-<host>-<pid><suffix>` beside the final path, removed on
errors and on SIGTERM, and removed by the next run after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from slidedata.errors import DataError
from slidedata.publish import PARTIAL_MARK, NotPublished, publishing
from submission.predict import DECIMALS, SamplePredictions

COLUMNS = ["cell_id", "gene", "prediction", "sample"]
__all__ = ["COLUMNS", "InvalidSubmission", "PARTIAL_MARK", "file_format", "id_positions", "long_blocks",
           "read_csv_options", "read_submission_blocks", "write_submission"]


class InvalidSubmission(NotPublished):
    """The written file failed its check; it was not put in place (`path`, `problems`)."""


def long_blocks(predictions: SamplePredictions, nuclei_per_block: int = 20000) -> Iterator[pd.DataFrame]:
    """The long format of one sample, `nuclei_per_block` nuclei (x genes rows) at a time; a sample without
    held-out nuclei gives one empty block, with the columns and dtypes of any other (so it concatenates)."""
    genes = pd.Categorical(predictions.genes, categories=predictions.genes)
    n_genes = len(predictions.genes)
    for start in range(0, max(len(predictions.cell_ids), 1), nuclei_per_block):
        ids = predictions.written_ids[start: start + nuclei_per_block]
        values = predictions.values[start: start + nuclei_per_block]
        yield pd.DataFrame({
            "cell_id": np.repeat(np.asarray(ids, dtype=np.int64 if predictions.names is None else object), n_genes),
            "gene": pd.Categorical.from_codes(np.tile(np.arange(n_genes), len(ids)), categories=genes.categories),
            "prediction": values.reshape(-1).astype(np.float64).round(DECIMALS),
            "sample": predictions.sample,
        })


def write_submission(predictions: Iterable[SamplePredictions], path: str | Path, nuclei_per_block: int = 20000,
                     check: Callable[[Path], list] | None = None, text_ids: bool | None = None) -> Path:
    """CSV (default) or Parquet (by suffix) with exactly the 4 columns; returns the final path.

    `predictions` are written as they come (a sample's rows are in the file before the next is computed). Parquet
    types `cell_id` once for the file: text where `text_ids` (some sample names its cells otherwise, e.g. Xenium's
    strings), else integers; None decides from the first sample (pass it where samples of both kinds are mixed).

    `check(temporary_path)` returns the file's problems; if there are any, the file is deleted instead of renamed
    into place and InvalidSubmission is raised (a previous file at `path` is left as it was).
    """
    path = Path(path)
    parquet = file_format(path) == "parquet"
    with publishing(path, validate=check, error=InvalidSubmission) as tmp:
        _write_blocks(iter(predictions), tmp, parquet, nuclei_per_block, text_ids)
    return path


def file_format(path: str | Path) -> str:
    """'parquet' (`.parquet`), 'csv.gz' (`.gz`: gzip-compressed CSV) or 'csv' (anything else). Names that promise
    another container or compression (.zip, .bz2, .xz, .zst, .tar.gz, .tgz, .gzip) are refused before any work:
    written as plain or gzip text under them, they would not read back as they say."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return "parquet"
    if last == ".gz" and ".tar" not in suffixes:
        return "csv.gz"
    if last in (".zip", ".bz2", ".xz", ".zst", ".tar", ".tgz", ".gzip", ".gz"):
        raise DataError(path, "-", f"a submission named {''.join(suffixes[-2:])} is not supported: name it .csv, "
                                   ".csv.gz or .parquet")
    return "csv"


def read_csv_options(path: str | Path) -> dict:
    """How pandas reads a CSV submission back: the compression its name says (`file_format`), never guessed."""
    return {"compression": "gzip" if file_format(path) == "csv.gz" else None}


@contextlib.contextmanager
def _text_out(tmp: Path) -> Iterator:
    """The CSV's text stream; gzip where the name says so, with no name or time in its header (the temporary name
    would be recorded, and two identical runs would differ)."""
    if file_format(tmp) != "csv.gz":
        with open(tmp, "w", newline="") as handle:
            yield handle
        return
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed, \
            io.TextIOWrapper(packed, newline="") as handle:
        yield handle


def _write_blocks(predictions: Iterator[SamplePredictions], tmp: Path, parquet: bool, nuclei_per_block: int,
                  text_ids: bool | None) -> None:
    if not parquet:
        with _text_out(tmp) as handle:
            handle.write(",".join(COLUMNS) + "\n")
            for sample_predictions in predictions:
                for block in long_blocks(sample_predictions, nuclei_per_block):
                    block.to_csv(handle, header=False, index=False, float_format=f"%.{DECIMALS}f")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if text_ids is None:
        first = next(predictions, None)
        text_ids = first is not None and first.names is not None
        predictions = itertools.chain([first] if first is not None else [], predictions)
    schema = pa.schema([("cell_id", pa.string() if text_ids else pa.int64()), ("gene", pa.string()),
                        ("prediction", pa.float64()), ("sample", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for sample_predictions in predictions:
            for block in long_blocks(sample_predictions, nuclei_per_block):
                block = block.astype({"gene": str, **({"cell_id": str} if text_ids else {})})
                writer.write_table(pa.Table.from_pandas(block, schema=schema, preserve_index=False))


def id_positions(expected: pd.Index, written: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The position in `expected` (a sample's ids as it gives them) of each id of a file's `cell_id` column, -1
    where it holds another, and which rows hold no id of the sample's kind. Integer ids compare as numbers (how a
    CSV reads them back); a value that is no positive whole number within int64 (1.5, -3, 2**64 - 5) is no id, never
    truncated or wrapped into one. Other ids (Xenium's strings) compare as text. The one rule of the validator and
    the scorer."""
    if pd.api.types.is_integer_dtype(expected.dtype):
        ids, not_an_id = _whole_number_ids(written)
        return expected.get_indexer(ids), not_an_id
    return expected.astype(str).get_indexer(written.astype(str).to_numpy()), np.zeros(len(written), dtype=bool)


def read_submission_blocks(path: str | Path, rows_per_block: int = 5_000_000) -> Iterator[pd.DataFrame]:
    """Stream a submission file back, CSV or Parquet."""
    path = Path(path)
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_block):
            yield batch.to_pandas()
    else:
        yield from pd.read_csv(path, chunksize=rows_per_block, dtype={"gene": str, "sample": str},
                               **read_csv_options(path))


def _whole_number_ids(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A cell_id column as int64 (-1 where it holds no id), and which rows hold no id: not a whole number (1.5), not
    positive, or beyond int64."""
    numbers = pd.to_numeric(column, errors="coerce")
    if pd.api.types.is_unsigned_integer_dtype(numbers):
        raw = numbers.to_numpy(np.uint64)
        valid = (raw > 0) & (raw <= np.iinfo(np.int64).max)
        ids = np.where(valid, raw, 0).astype(np.int64)
    elif pd.api.types.is_integer_dtype(numbers):
        ids = numbers.to_numpy(np.int64)
        valid = ids > 0
    else:
        values = numbers.to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(values) & (values > 0) & (values < 2.0 ** 63) & (values == np.round(values))
        ids = np.where(valid, values, 0).astype(np.int64)
    return np.where(valid, ids, -1), ~valid
