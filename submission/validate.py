"""Check a submission file against the data before the challenge does.

    python -m submission.validate FILE --data DIR

Every expected (sample, cell_id, gene) exactly once, nothing else; a float `prediction` column (the challenge checks
the column's type: text that parses as numbers is refused, in Parquet too), predictions finite, non-negative, with
at most 2 decimals; n_held_out x n_genes rows per sample. Each problem is reported with a count and examples, and the
exit status is non-zero if there is any.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slidedata.sample import HELD_OUT_GROUPS, Sample, open_samples
from submission.writer import COLUMNS, read_submission_blocks


NOT_FLOAT = "prediction column is not float"


@dataclass
class Problem:
    kind: str
    count: int
    examples: list = field(default_factory=list)

    def __str__(self) -> str:
        shown = "; ".join(str(e) for e in self.examples[:5])
        return f"{self.kind}: {self.count}" + (f" (e.g. {shown})" if shown else "")


class _Tally:
    """Problems by kind, with a count and a few examples each."""

    def __init__(self):
        self.problems: dict[str, Problem] = {}

    def add(self, kind: str, count: int, examples) -> None:
        if count:
            problem = self.problems.setdefault(kind, Problem(kind, 0, []))
            problem.count += int(count)
            problem.examples.extend(list(examples)[: max(0, 5 - len(problem.examples))])


def expected_held_out(samples: list[Sample]) -> dict[str, np.ndarray]:
    """Held-out cell_ids (validation and test groups) per sample, sorted."""
    return {s.name: np.sort(s.groups.index[s.groups.isin(HELD_OUT_GROUPS)].to_numpy(np.int64)) for s in samples}


def validate_submission(path: str | Path, samples: list[Sample], genes: list[str] | None = None) -> list[Problem]:
    """All problems of the file at `path` against `samples` (empty list = valid)."""
    path = Path(path)
    genes = genes or next((s.genes for s in samples if s.has_expression), None)
    if genes is None:
        raise ValueError("no sample has expression to take the gene list from; pass genes=")
    expected = expected_held_out(samples)
    cell_index = {name: pd.Index(ids) for name, ids in expected.items()}
    gene_index = pd.Index(genes)
    seen = {name: np.zeros((len(ids), len(genes)), dtype=np.uint16) for name, ids in expected.items()}
    tally = _Tally()
    try:
        _check_prediction_type(path, tally)
        blocks = read_submission_blocks(path)
        first = True
        for block in blocks:
            if first and list(block.columns) != COLUMNS:
                return [Problem("wrong columns", 1, [f"expected {COLUMNS}, found {list(block.columns)}"])]
            first = False
            _check_block(block, cell_index, gene_index, seen, tally)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return [Problem("unreadable file", 1, [f"{path}: {exc}"])]

    for name, counts in seen.items():
        missing = np.argwhere(counts == 0)
        tally.add("missing rows", len(missing),
                  [(name, int(expected[name][i]), genes[j]) for i, j in missing[:5]])
        dup = np.argwhere(counts > 1)
        tally.add("duplicated rows", int((counts[counts > 1] - 1).sum()),
                  [(name, int(expected[name][i]), genes[j]) for i, j in dup[:5]])
        n_rows, want = int(counts.sum()), counts.size
        if n_rows != want:
            tally.add("wrong row count per sample", 1,
                      [f"{name}: {n_rows} rows, expected {len(expected[name])} nuclei x {len(genes)} genes = {want}"])
    return list(tally.problems.values())


def _check_prediction_type(path: Path, tally: _Tally) -> None:
    """Parquet stores the column's type: it must be a float, whatever the values look like as text."""
    if path.suffix != ".parquet":
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    if "prediction" in schema.names and not pa.types.is_floating(schema.field("prediction").type):
        tally.add(NOT_FLOAT, 1, [f"Parquet type {schema.field('prediction').type}"])


def _check_block(block: pd.DataFrame, cell_index, gene_index, seen, tally: _Tally) -> None:
    if not pd.api.types.is_float_dtype(block["prediction"]) and NOT_FLOAT not in tally.problems:
        tally.add(NOT_FLOAT, 1, [f"read as {block['prediction'].dtype}"])
    values = pd.to_numeric(block["prediction"], errors="coerce").to_numpy(np.float64)
    raw = block["prediction"]
    not_numeric = np.isnan(values) & raw.notna().to_numpy() & (raw.astype(str).str.lower() != "nan").to_numpy()
    tally.add("non-numeric predictions", not_numeric.sum(), raw[not_numeric].head(5).tolist())
    nan = np.isnan(values) & ~not_numeric
    tally.add("NaN predictions", nan.sum(), block.loc[nan, ["sample", "cell_id", "gene"]].head(5).values.tolist())
    inf = np.isinf(values)
    tally.add("infinite predictions", inf.sum(), block.loc[inf, ["sample", "cell_id", "gene"]].head(5).values.tolist())
    negative = values < 0
    tally.add("negative predictions", negative.sum(), values[negative][:5].tolist())
    finite = np.isfinite(values)
    scaled = np.where(finite, values, 0.0) * 100
    decimals = finite & (np.abs(scaled - np.round(scaled)) > 1e-6)
    tally.add("more than 2 decimals", decimals.sum(), values[decimals][:5].tolist())

    cell_ids = pd.to_numeric(block["cell_id"], errors="coerce")
    samples = block["sample"].astype(str).to_numpy()
    genes = gene_index.get_indexer(block["gene"].astype(str))
    unknown_gene = genes < 0
    tally.add("unknown genes", unknown_gene.sum(), pd.unique(block["gene"][unknown_gene])[:5].tolist())
    for name in pd.unique(samples):
        rows = samples == name
        if name not in cell_index:
            tally.add("rows of an unknown sample", rows.sum(), [name])
            continue
        ids = cell_ids[rows].to_numpy()
        cells = cell_index[name].get_indexer(np.where(np.isnan(ids), -1, ids).astype(np.int64))
        unknown_cell = cells < 0
        tally.add("rows for cell_ids that are not held out in this sample", unknown_cell.sum(),
                  [(name, c) for c in pd.unique(ids[unknown_cell])[:5]])
        ok = ~unknown_cell & ~unknown_gene[rows]
        np.add.at(seen[name], (cells[ok], genes[rows][ok]), 1)


def main(argv: list[str] | None = None, prog: str = "python -m submission.validate") -> int:
    from slidedata.cli import add_debug_flag, run_reporting_input_errors

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("file", help="submission CSV or Parquet")
    parser.add_argument("--data", required=True, help="a sample zarr or folder of <sample>.zarr")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def stage() -> int:
        problems = validate_submission(args.file, open_samples(args.data))
        if problems:
            print(f"{args.file}: INVALID")
            for problem in problems:
                print(f"  - {problem}")
            return 1
        print(f"{args.file}: valid")
        return 0

    return run_reporting_input_errors(stage, args.debug)


if __name__ == "__main__":
    sys.exit(main())
