"""Score a submission file against held-out truth with the project's own metric.

    python -m submission.score --submission FILE --truth DIR [--data DIR]

The truth folder holds one `<sample>.h5ad` per sample (`slidedata.truth`; the spot importer writes it when it holds
tissue out). The score is the challenge's cell-wise Spearman: per nucleus, the Spearman correlation across genes of
prediction and measurement (`regress.metrics.cellwise_spearman`), averaged over the nuclei of each held-out region,
then over regions, then over samples (`official_score`). With `--data` (the samples the model was fitted on) the
mean profile of their training nuclei is scored beside it, rounded as a submission is: the bar a model has to clear.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from regress.metrics import cellwise_spearman, official_score
from slidedata.errors import DataError
from slidedata.sample import Elements, dense, open_samples
from slidedata.truth import REGION, read_truth
from submission.predict import finalise
from submission.writer import id_positions, read_submission_blocks


@dataclass
class ScoreReport:
    official: float  # the challenge's aggregation over every truth sample
    mean_profile: float | None  # the same for the training nuclei's mean profile (None without data)
    per_sample: pd.DataFrame  # sample, nuclei, regions, spearman, mean_profile


def score_submission(submission: str | Path, truth: str | Path, data: str | Path | None = None,
                     elements: Elements | None = None) -> ScoreReport:
    """Score `submission` on every nucleus and gene of the truth folder; every one of them must be predicted."""
    submission = Path(submission)
    tables = read_truth(truth)
    wanted = {name: (_truth_ids(t.obs["cell_id"]), pd.Index([str(g) for g in t.var_names]))
              for name, t in tables.items()}
    predicted = {name: np.full((len(cells), len(genes)), np.nan) for name, (cells, genes) in wanted.items()}
    try:
        for block in read_submission_blocks(submission):
            _fill(submission, block, wanted, predicted)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise DataError(submission, "-", f"not a readable submission ({type(exc).__name__}: {exc})") from exc
    for name, values in predicted.items():
        missing = np.argwhere(np.isnan(values))
        if len(missing):
            cells, genes = wanted[name]
            i, j = missing[0]
            raise DataError(submission, "rows", f"{len(missing)} of the {values.size} (nucleus, gene) pairs of "
                                                f"sample {name}'s truth have no prediction, e.g. cell_id "
                                                f"{cells[i]}, gene {genes[j]}")
    profile = _mean_profile(data, elements) if data is not None else None
    rows, per_nucleus, mean_per_nucleus, samples, regions = [], [], [], [], []
    for name, table in tables.items():
        truth_values = dense(table.X, np.float64)
        score = cellwise_spearman(truth_values, predicted[name])
        region = table.obs[REGION].astype(str).to_numpy()
        row = {"sample": name, "nuclei": len(score), "regions": len(set(region)),
               "spearman": official_score(score, np.full(len(score), name), region)}
        if profile is not None:
            genes = wanted[name][1]
            absent = genes.difference(profile.index)
            if len(absent):
                raise DataError(data, "anucleus", f"the training samples lack {len(absent)} of sample {name}'s "
                                                  f"truth genes, e.g. {list(absent[:5])}")
            baseline = np.broadcast_to(finalise(profile.reindex(genes).to_numpy()), truth_values.shape)
            mean_score = cellwise_spearman(truth_values, baseline)
            row["mean_profile"] = official_score(mean_score, np.full(len(score), name), region)
            mean_per_nucleus.append(mean_score)
        rows.append(row)
        per_nucleus.append(score)
        samples.append(np.full(len(score), name))
        regions.append(region)
    samples_all, regions_all = np.concatenate(samples), np.concatenate(regions)
    official = official_score(np.concatenate(per_nucleus), samples_all, regions_all)
    mean = (official_score(np.concatenate(mean_per_nucleus), samples_all, regions_all)
            if profile is not None else None)
    return ScoreReport(official, mean, pd.DataFrame(rows))


def _fill(submission: Path, block: pd.DataFrame, wanted: dict, predicted: dict) -> None:
    """Put a block's predictions of truth nuclei in place; rows of other samples or nuclei are not scored, and a
    cell_id that is no id (1.5, -3 where the sample's ids are integers) is refused rather than truncated into one."""
    samples = block["sample"].astype(str).to_numpy()
    for name in pd.unique(samples):
        if name not in wanted:
            continue
        rows = block[samples == name]
        cells, genes = wanted[name]
        i, not_an_id = id_positions(cells, rows["cell_id"])
        if not_an_id.any():
            raise DataError(submission, "cell_id", f"{int(not_an_id.sum())} row(s) of sample {name} hold a cell_id "
                                                   "that is not a positive whole number, e.g. "
                                                   f"{rows['cell_id'][not_an_id].iloc[0]!r}")
        j = genes.get_indexer(rows["gene"].astype(str).to_numpy())
        ok = (i >= 0) & (j >= 0)
        predicted[name][i[ok], j[ok]] = pd.to_numeric(rows["prediction"]).to_numpy(np.float64)[ok]


def _truth_ids(column: pd.Series) -> pd.Index:
    """A truth table's cell ids as the sample gives them: integers, or text (Xenium's ids)."""
    if pd.api.types.is_numeric_dtype(column.dtype):
        return pd.Index(column.to_numpy(np.int64))
    return pd.Index(column.astype(str).to_numpy(), dtype=object)


def _mean_profile(data: str | Path, elements: Elements | None = None) -> pd.Series:
    """The mean expression of every measured training nucleus of the samples under `data` (the mean-profile model)."""
    total, count, genes = None, 0, None
    for sample in open_samples(data, elements=elements):
        if not sample.has_expression:
            continue
        train = sample.expression.obs["cell_id"].map(sample.groups).to_numpy() == "train"
        values = dense(sample.expression.X, np.float64)[train]
        total = values.sum(axis=0, dtype=np.float64) + (0 if total is None else total)
        count += len(values)
        genes = sample.genes
    if not count:
        raise DataError(data, "anucleus", "no measured training nucleus to take a mean profile from")
    return pd.Series(total / count, index=genes)


def main(argv: list[str] | None = None, prog: str = "python -m submission.score") -> int:
    from slidedata.cli import (StageParser, add_output_flags, add_sample_arguments, elements_from_args,
                               run_reporting_input_errors)

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--submission", required=True, help="submission CSV or Parquet")
    parser.add_argument("--truth", required=True, help="folder of <sample>.h5ad truth tables (<import out>/truth)")
    parser.add_argument("--data", help="the samples the model was fitted on: also score their mean profile")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)

    def stage() -> int:
        report = score_submission(args.submission, args.truth, args.data, elements_from_args(args))
        for row in report.per_sample.itertuples():
            beside = f" (mean profile {row.mean_profile:.4f})" if report.mean_profile is not None else ""
            print(f"{row.sample}: {row.nuclei} held-out nuclei in {row.regions} region(s), cell-wise Spearman "
                  f"{row.spearman:.4f}{beside}")
        beside = f"; mean profile {report.mean_profile:.4f}" if report.mean_profile is not None else ""
        print(f"official cell-wise Spearman (nuclei, then regions, then samples): {report.official:.4f}{beside}")
        return 0

    return run_reporting_input_errors(stage, args)


if __name__ == "__main__":
    sys.exit(main())
