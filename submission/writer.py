"""Write the challenge's long table (cell_id, gene, prediction, sample) in bounded chunks, atomically.

10^5 nuclei x 460 genes is 4.6e7 rows: each chunk of nuclei becomes one block of rows (CSV text or a Parquet row
group), so memory stays at one block. The file appears under its final name only once complete and checked
(`slidedata.publish`): while being written it is `.<name>.partial-<host>-<pid><suffix>` beside the final path, removed on
errors and on SIGTERM, and removed by the next run after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from slidedata.errors import DataError
from slidedata.publish import PARTIAL_MARK, NotPublished, publishing
from submission.predict import DECIMALS, SamplePredictions

COLUMNS = ["cell_id", "gene", "prediction", "sample"]
# A `.csv.gz` at gzip's own default level: GzipFile's default, 9, took 4.9 times as long for 2 % fewer bytes on this
# writer's text (benchmarks/bench_writer.py: 42 s against 8.7 s a block of 9.2 million rows).
GZIP_LEVEL = 6
__all__ = ["COLUMNS", "InvalidSubmission", "PARTIAL_MARK", "file_format", "id_positions", "long_blocks",
           "read_csv_options", "read_submission_blocks", "write_submission"]


class InvalidSubmission(NotPublished):
    """The written file failed its check; it was not put in place (`path`, `problems`)."""


def long_blocks(predictions: SamplePredictions, nuclei_per_block: int = 20000) -> Iterator[pd.DataFrame]:
    """The long format of one sample, `nuclei_per_block` nuclei (x genes rows) at a time; a sample without
    held-out nuclei gives one empty block, with the columns and dtypes of any other (so it concatenates)."""
    for ids, values in _nucleus_blocks(predictions, nuclei_per_block):
        yield _long_frame(predictions, ids, values)


def _nucleus_blocks(predictions: SamplePredictions, nuclei_per_block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(written ids, values) of `nuclei_per_block` nuclei at a time; one empty block for a sample without any."""
    for start in range(0, max(len(predictions.cell_ids), 1), nuclei_per_block):
        yield (predictions.written_ids[start: start + nuclei_per_block],
               predictions.values[start: start + nuclei_per_block])


def _long_frame(predictions: SamplePredictions, ids: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    n_genes = len(predictions.genes)
    return pd.DataFrame({
        "cell_id": np.repeat(np.asarray(ids, dtype=np.int64 if predictions.names is None else object), n_genes),
        "gene": pd.Categorical.from_codes(np.tile(np.arange(n_genes), len(ids)), categories=predictions.genes),
        "prediction": values.reshape(-1).astype(np.float64).round(DECIMALS),
        "sample": predictions.sample,
    })


def csv_rows(predictions: SamplePredictions, ids: np.ndarray, values: np.ndarray) -> bytes:
    """The CSV lines of some nuclei of a sample, exactly as pandas writes `_long_frame` with `%.2f` (the test
    compares them byte for byte), 8 times faster (benchmarks/bench_writer.py): a whole challenge is some 7.7e8 rows.

    Built by pyarrow's string kernels: each prediction as whole and hundredths of its rounded value (how `%.2f`
    prints a value already rounded to 2 decimals), each row joined with commas and ending in a newline, so the
    array's data buffer is the text. Values that are not finite and non-negative (-0.0 included: pandas writes
    '-0.00'), names that CSV would quote (a comma, a quote, a line break), ids that are not text where the sample
    names its cells (None, NaN), and a gene named twice (pandas refuses it) go to pandas itself."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rounded = values.reshape(-1).astype(np.float64).round(DECIMALS)
    if not rounded.size:
        return b""
    names = [predictions.sample, *map(str, predictions.genes)]
    text_ids = predictions.names is not None
    if not (np.isfinite(rounded).all() and not np.signbit(rounded).any() and rounded.max() < 1e12) \
            or any(_needs_quotes(name) for name in names) or len(set(names[1:])) < len(names) - 1 \
            or (text_ids and any(not isinstance(i, str) or _needs_quotes(i) for i in ids)):
        return _long_frame(predictions, ids, values).to_csv(header=False, index=False,
                                                            float_format=f"%.{DECIMALS}f").encode()
    n_genes = len(predictions.genes)
    hundredths = np.rint(rounded * 10 ** DECIMALS).astype(np.int64)
    prediction = pc.binary_join_element_wise(
        pc.cast(pa.array(hundredths // 10 ** DECIMALS), pa.string()),
        pc.utf8_lpad(pc.cast(pa.array(hundredths % 10 ** DECIMALS), pa.string()), DECIMALS, "0"), ".")
    cell = pa.array([str(i) for i in ids] if text_ids else np.asarray(ids, dtype=np.int64))
    # large_string: 64-bit offsets, so a block of any size fits in one buffer
    cell = pc.take(pc.cast(cell, pa.large_string()), pa.array(np.repeat(np.arange(len(ids)), n_genes)))
    gene = pc.take(pa.array(names[1:], pa.large_string()), pa.array(np.tile(np.arange(n_genes), len(ids))))
    lines = pc.binary_join_element_wise(cell, gene, prediction.cast(pa.large_string()),
                                        pa.scalar(predictions.sample + "\n", pa.large_string()),
                                        pa.scalar(",", pa.large_string()))
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset: lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[offsets[0]: offsets[-1]].tobytes()


def _needs_quotes(text: str) -> bool:
    return any(c in text for c in ',"\n\r')


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
def _csv_out(tmp: Path) -> Iterator:
    """The CSV's byte stream; gzip where the name says so, with no name or time in its header (the temporary name
    would be recorded, and two identical runs would differ)."""
    if file_format(tmp) != "csv.gz":
        with open(tmp, "wb") as handle:
            yield handle
        return
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=GZIP_LEVEL) as packed:
        yield packed


def _write_blocks(predictions: Iterator[SamplePredictions], tmp: Path, parquet: bool, nuclei_per_block: int,
                  text_ids: bool | None) -> None:
    if not parquet:
        with _csv_out(tmp) as handle:
            handle.write((",".join(COLUMNS) + "\n").encode())
            for sample_predictions in predictions:
                for ids, values in _nucleus_blocks(sample_predictions, nuclei_per_block):
                    handle.write(csv_rows(sample_predictions, ids, values))
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
