"""Check a submission file against the data before the challenge does.

    python -m submission.validate FILE --data DIR [--model-dir DIR]

Every expected (sample, cell_id, gene) exactly once, nothing else; a float `prediction` column (the challenge checks
the column's type: text that parses as numbers is refused, in Parquet too), predictions finite, non-negative, with
at most 2 decimals; n_held_out x n_genes rows per sample, the genes of the sample's own panel where it has
expression, else the model's (`expected_genes`). A file of no rows is valid where no nucleus is held out. Each
problem is reported with a count and examples, and the exit status is non-zero if there is any.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slidedata.errors import DataError
from slidedata.sample import (EXPRESSION, HELD_OUT_GROUPS, MAX_LOG_EXPRESSION, SCALE_FACTOR, Sample,
                              open_samples)
from submission.predict import DECIMALS
from submission.writer import COLUMNS, file_format, id_positions, read_csv_options, read_submission_blocks


NOT_FLOAT = "prediction column is not float"
# The largest valid prediction: log1p(100) clipped, then rounded to DECIMALS as the writer rounds (4.6151 -> 4.62).
MAX_PREDICTION = float(np.ceil(MAX_LOG_EXPRESSION * 10 ** DECIMALS) / 10 ** DECIMALS)


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
    """Held-out cell_ids (validation and test groups) per sample, sorted, as the sample gives them (its mask's
    integers, or its own ids such as Xenium's strings: `Sample.names_of`)."""
    return {s.name: s.names_of(np.sort(s.groups.index[s.groups.isin(HELD_OUT_GROUPS)].to_numpy(np.int64)))
            for s in samples}


def expected_genes(samples: list[Sample], genes: list[str] | None = None) -> dict[str, list[str]]:
    """The genes each sample's rows must cover: the validator's rule (the writer does not call it; it writes the
    model's genes for every held-out nucleus, which the last sentence below makes the same genes).

    A sample with expression: its own panel. A sample without (like DC1, or a challenge test sample): `genes`, the
    model's panel; where no model is at hand (the validator's CLI without --model-dir), the panel of the samples
    with expression. A model never predicts a sample whose panel differs from its own
    (`submission.predict.check_gene_panel`), so where both exist they are the same genes.
    """
    fallback = genes or next((s.genes for s in samples if s.has_expression), None)
    panels = {}
    for sample in samples:
        panel = sample.genes if sample.has_expression else fallback
        if panel is None:
            raise DataError(sample.path, EXPRESSION, "no expression to take the gene panel from, and no model's "
                                                     "panel given (--model-dir)")
        panels[sample.name] = list(panel)
    return panels


def validate_submission(path: str | Path, samples: list[Sample], genes: list[str] | None = None) -> list[Problem]:
    """All problems of the file at `path` against `samples` (empty list = valid). `genes`: the model's panel, the
    one expected of samples without expression (`expected_genes`)."""
    path = Path(path)
    panels = expected_genes(samples, genes)
    expected = expected_held_out(samples)
    cell_index = {name: pd.Index(ids) for name, ids in expected.items()}
    gene_index = {name: pd.Index(panel) for name, panel in panels.items()}
    seen = {name: np.zeros((len(ids), len(panels[name])), dtype=np.uint16) for name, ids in expected.items()}
    tally = _Tally()
    try:
        columns = _columns(path)
        if columns != COLUMNS:
            return [Problem("wrong columns", 1, [f"expected {COLUMNS}, found {columns}"])]
        _check_prediction_type(path, tally)
        for block in read_submission_blocks(path):
            _check_block(block, cell_index, gene_index, seen, tally)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return [Problem("unreadable file", 1, [f"{path}: {exc}"])]

    for name, counts in seen.items():
        genes_here = panels[name]
        missing = np.argwhere(counts == 0)
        tally.add("missing rows", len(missing),
                  [(name, _plain(expected[name][i]), genes_here[j]) for i, j in missing[:5]])
        dup = np.argwhere(counts > 1)
        tally.add("duplicated rows", int((counts[counts > 1] - 1).sum()),
                  [(name, _plain(expected[name][i]), genes_here[j]) for i, j in dup[:5]])
        n_rows, want = int(counts.sum()), counts.size
        if n_rows != want:
            tally.add("wrong row count per sample", 1,
                      [f"{name}: {n_rows} rows, expected {len(expected[name])} nuclei x {len(genes_here)} genes "
                       f"= {want}"])
    return list(tally.problems.values())


def _plain(value):
    """A numpy scalar as the Python value it holds (examples print as 7, not np.int64(7))."""
    return value.item() if isinstance(value, np.generic) else value


def _columns(path: Path) -> list[str]:
    """The file's columns, read from its header (a file of no rows has one too)."""
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    return [str(c) for c in pd.read_csv(path, nrows=0, **read_csv_options(path)).columns]


def _check_prediction_type(path: Path, tally: _Tally) -> None:
    """Parquet stores the column's type: it must be a float, whatever the values look like as text."""
    if file_format(path) != "parquet":
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    if "prediction" in schema.names and not pa.types.is_floating(schema.field("prediction").type):
        tally.add(NOT_FLOAT, 1, [f"Parquet type {schema.field('prediction').type}"])


def _check_block(block: pd.DataFrame, cell_index, gene_index, seen, tally: _Tally) -> None:
    if block.empty:  # a file of no rows (no held-out nucleus anywhere): a CSV header has no type to check
        return
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
    too_high = values > MAX_PREDICTION
    tally.add(f"predictions above log1p({SCALE_FACTOR}) = {MAX_LOG_EXPRESSION:.4f} (the most a log1p(counts / total "
              f"* {SCALE_FACTOR}) value can hold; {MAX_PREDICTION} after rounding)", too_high.sum(),
              values[too_high][:5].tolist())
    finite = np.isfinite(values)
    scaled = np.where(finite, values, 0.0) * 100
    decimals = finite & (np.abs(scaled - np.round(scaled)) > 1e-6)
    tally.add("more than 2 decimals", decimals.sum(), values[decimals][:5].tolist())

    samples = block["sample"].astype(str).to_numpy()
    gene_names = block["gene"].astype(str).to_numpy()
    for name in pd.unique(samples):
        rows = samples == name
        if name not in cell_index:
            tally.add("rows of an unknown sample", rows.sum(), [name])
            continue
        genes = gene_index[name].get_indexer(gene_names[rows])
        unknown_gene = genes < 0
        tally.add("unknown genes", unknown_gene.sum(),
                  [(name, g) for g in pd.unique(gene_names[rows][unknown_gene])[:5]])
        ids = block["cell_id"][rows]
        cells, not_an_id = id_positions(cell_index[name], ids)
        tally.add("cell_ids that are not positive whole numbers", not_an_id.sum(),
                  [(name, str(c)) for c in pd.unique(ids.to_numpy()[not_an_id])[:5]])
        unknown_cell = cells < 0
        other = unknown_cell & ~not_an_id
        tally.add("rows for cell_ids that are not held out in this sample", other.sum(),
                  [(name, _plain(c)) for c in pd.unique(ids.to_numpy()[other])[:5]])
        ok = ~unknown_cell & ~unknown_gene
        np.add.at(seen[name], (cells[ok], genes[ok]), 1)


def main(argv: list[str] | None = None, prog: str = "python -m submission.validate") -> int:
    from slidedata.cli import (StageParser, add_output_flags, add_sample_arguments, elements_from_args,
                               run_reporting_input_errors)

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="submission CSV or Parquet")
    parser.add_argument("--submission", help="the same file, named as `he2expr score` names it")
    parser.add_argument("--data", required=True, help="a sample zarr or folder of <sample>.zarr")
    parser.add_argument("--model-dir", help="the model that wrote the file: its genes are expected of samples "
                                            "without expression (default: those of the samples with expression)")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)
    if (args.file is None) == (args.submission is None):
        parser.error("give the submission file once: as the first argument or as --submission")
    args.file = args.file or args.submission

    def stage() -> int:
        genes = None
        if args.model_dir:
            from regress.model_dir import ModelDir

            genes = ModelDir(args.model_dir).load_predictor().genes
        samples = open_samples(args.data, elements=elements_from_args(args))
        problems = validate_submission(args.file, samples, genes)
        if problems:
            print(f"{args.file}: INVALID")
            for problem in problems:
                print(f"  - {problem}")
            return 1
        held_out = sum(len(ids) for ids in expected_held_out(samples).values())
        print(f"{args.file}: valid" + ("" if held_out else " (and empty: no nucleus of the data is held out, so "
                                       "there is nothing to predict; he2expr import --hold-out-blocks holds tissue "
                                       "out)"))
        return 0

    return run_reporting_input_errors(stage, args)


if __name__ == "__main__":
    sys.exit(main())
