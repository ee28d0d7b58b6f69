"""Predictions for the held-out nuclei of each sample, as dense blocks (never one row per gene in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regress.predictor import ExpressionPredictor
from slidedata.feature_store import FeatureStore
from slidedata.errors import DataError
from slidedata.sample import HELD_OUT_GROUPS, MAX_LOG_EXPRESSION, Sample

DECIMALS = 2


@dataclass
class SamplePredictions:
    sample: str
    cell_ids: np.ndarray  # (n,) int64
    genes: list[str]
    values: np.ndarray  # (n, g) float32 log1p(counts / total * 100), clipped and rounded
    # The ids as the sample gives them (e.g. Xenium's strings), what the files write; None: `cell_ids` themselves
    names: np.ndarray | None = None

    @property
    def written_ids(self) -> np.ndarray:
        return self.cell_ids if self.names is None else self.names

    @property
    def n_rows(self) -> int:
        return len(self.cell_ids) * len(self.genes)


def finalise(values: np.ndarray, clip_max: np.ndarray | None = None) -> np.ndarray:
    """Clip to [0, clip_max] (the challenge rejects negatives) and never above log1p(100), the most a
    log1p(counts / total * 100) value can hold; replace non-finite values by 0; round to 2 decimals."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = MAX_LOG_EXPRESSION if clip_max is None else np.minimum(clip_max, MAX_LOG_EXPRESSION)
    values = np.clip(values, 0.0, top)
    return np.round(values, DECIMALS)


def check_gene_panel(genes: list[str], sample: Sample) -> None:
    """Refuse a sample whose own gene panel (where it has expression) is not the model's: its held-out nuclei
    would be predicted, and the file checked, on genes the sample does not measure, and its own genes missed.
    Order does not matter (every row names its gene); a sample without expression takes the model's panel."""
    if not sample.has_expression:
        return
    model, here = list(genes), sample.genes
    if set(model) == set(here):
        return
    missing = [g for g in model if g not in set(here)]
    extra = [g for g in here if g not in set(model)]
    raise DataError(sample.path, sample.elements.table,
                    f"sample {sample.name}'s gene panel differs from the model's: {len(set(model) & set(here))} of "
                    f"the model's {len(model)} genes shared; {len(missing)} of the model's genes missing here "
                    f"(e.g. {missing[:5]}), {len(extra)} genes here the model does not know (e.g. {extra[:5]}). "
                    "Fit the model on data with this panel, or re-import the sample with the model's genes")


def predict_held_out(predictor: ExpressionPredictor, store: FeatureStore | None, sample: Sample,
                     groups: tuple[str, ...] = HELD_OUT_GROUPS) -> SamplePredictions:
    """Every nucleus of `sample` in `groups` (default: validation and test), sorted by cell_id. None is a normal
    case (e.g. a sample imported with every cell in 'train'): empty predictions, read from no cache (`store` may
    then be None)."""
    check_gene_panel(predictor.genes, sample)
    if not sample.groups.isin(groups).any():
        return SamplePredictions(sample.name, np.zeros(0, np.int64), list(predictor.genes),
                                 np.zeros((0, len(predictor.genes)), np.float32))
    nuclei = store.nuclei(sample, if_changed="raise")  # cached once the sample is embedded; refused if it changed
    keep = np.flatnonzero(np.isin(sample.group_of(nuclei["cell_id"].to_numpy(np.int64)), groups))
    cell_ids, values = predictor.predict_sample(store, sample.name, nuclei, rows=keep)
    order = np.argsort(cell_ids, kind="stable")
    clip_max = getattr(predictor.estimator, "clip_max_", None)
    cell_ids = cell_ids[order]
    return SamplePredictions(sample.name, cell_ids, list(predictor.genes),
                             finalise(values[order], clip_max).astype(np.float32),
                             None if sample.id_names is None else sample.names_of(cell_ids))
