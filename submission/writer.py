"""Write the challenge's long table (cell_id, gene, prediction, sample) in bounded chunks, atomically.

10^5 nuclei x 460 genes is 4.6e7 rows: each chunk of nuclei becomes one block of rows (CSV text or a Parquet row
group), so memory stays at one block. The file appears under its final name only once complete and checked
(`slidedata.publish`): while being written it is `.<name>.partial-<host>-<pid><suffix>` beside the final path, removed on
errors and on SIGTERM, and removed by the next run after a SIGKILL.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from slidedata.publish import PARTIAL_MARK, NotPublished, publishing
from submission.predict import DECIMALS, SamplePredictions

COLUMNS = ["cell_id", "gene", "prediction", "sample"]
__all__ = ["COLUMNS", "InvalidSubmission", "PARTIAL_MARK", "id_positions", "long_blocks", "read_submission_blocks",
           "write_submission"]


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
    with publishing(path, validate=check, error=InvalidSubmission) as tmp:
        _write_blocks(iter(predictions), tmp, path.suffix == ".parquet", nuclei_per_block, text_ids)
    return path


def _write_blocks(predictions: Iterator[SamplePredictions], tmp: Path, parquet: bool, nuclei_per_block: int,
                  text_ids: bool | None) -> None:
    if not parquet:
        with open(tmp, "w") as handle:
            handle.write(",".join(COLUMNS) + "\n")
        for sample_predictions in predictions:
            for block in long_blocks(sample_predictions, nuclei_per_block):
                block.to_csv(tmp, mode="a", header=False, index=False, float_format=f"%.{DECIMALS}f")
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


def id_positions(expected: pd.Index, written: pd.Series) -> np.ndarray:
    """The position in `expected` (a sample's ids as it gives them) of each id of a file's `cell_id` column, -1
    where it holds another: integer ids compare as numbers (how a CSV reads them back), other ids (Xenium's
    strings) as text. The one rule of the validator and the scorer."""
    if pd.api.types.is_integer_dtype(expected.dtype):
        numbers = pd.to_numeric(written, errors="coerce").to_numpy(np.float64)
        return expected.get_indexer(np.where(np.isnan(numbers), -1, numbers).astype(np.int64))
    return expected.astype(str).get_indexer(written.astype(str).to_numpy())


def read_submission_blocks(path: str | Path, rows_per_block: int = 5_000_000) -> Iterator[pd.DataFrame]:
    """Stream a submission file back, CSV or Parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_block):
            yield batch.to_pandas()
    else:
        yield from pd.read_csv(path, chunksize=rows_per_block, dtype={"gene": str, "sample": str})
