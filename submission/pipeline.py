"""The submission stage as a library call: predictions for every held-out nucleus, written and validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from regress.model_dir import ModelDir
from slidedata.feature_store import FeatureStore
from slidedata.publish import check_writable
from slidedata.sample import open_samples
from submission.predict import SamplePredictions, check_gene_panel, predict_held_out
from submission.validate import Problem, validate_submission
from submission.writer import InvalidSubmission, write_submission


@dataclass
class SubmissionReport:
    path: Path
    rows: int
    per_sample: dict[str, int]  # held-out nuclei per sample
    problems: list[Problem]  # non-empty: the file failed validation and was not written to `path`


def make_submission(data: str | Path, cache: str | Path, model_dir: str | Path, out: str | Path,
                    anndata_dir: str | Path | None = None, into_spatialdata: bool = False,
                    maps_dir: str | Path | None = None) -> SubmissionReport:
    """Predict, write the 4-column file (CSV or Parquet by suffix) and validate it before it is renamed into place
    (an invalid file never reaches `out`), optionally AnnData and maps of the predictions (`maps_dir`) too.

    Every output location (`out`, `anndata_dir`, the sample zarrs `into_spatialdata` writes into) is checked before
    any work: one that cannot be written is refused then, not after the predictions.
    """
    check_writable(out, folder=False)
    for folder in (anndata_dir, maps_dir):
        if folder is not None:
            check_writable(folder)
    predictor = ModelDir(model_dir).load_predictor()
    store = FeatureStore(cache, create=False)  # never embeds: a missing cache is an error, never created
    samples = open_samples(data)
    for sample in samples:  # every sample before any prediction: a wrong panel costs no time
        check_gene_panel(predictor.genes, sample)
    if into_spatialdata:
        for sample in samples:
            check_writable(sample.path)
    predictions: list[SamplePredictions] = [predict_held_out(predictor, store, s) for s in samples]
    per_sample = {p.sample: len(p.cell_ids) for p in predictions}
    try:
        path = write_submission(predictions, out,
                                check=lambda written: validate_submission(written, samples, predictor.genes))
    except InvalidSubmission as invalid:
        return SubmissionReport(invalid.path, 0, per_sample, invalid.problems)
    if anndata_dir is not None:
        from submission.anndata_io import write_anndata

        write_anndata(predictions, anndata_dir)
    if into_spatialdata:
        from submission.anndata_io import add_to_spatialdata

        for sample, p in zip(samples, predictions):
            add_to_spatialdata(sample.path, p)
    if maps_dir is not None:
        from submission.maps import write_prediction_maps

        write_prediction_maps(predictions, samples, store, maps_dir)
    return SubmissionReport(path, sum(p.n_rows for p in predictions), per_sample, [])
