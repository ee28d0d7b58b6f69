"""Predictions for the held-out nuclei of each sample, as dense blocks (never one row per gene in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regress.predictor import ExpressionPredictor
from slidedata.feature_store import FeatureStore
from slidedata.sample import HELD_OUT_GROUPS, Sample

DECIMALS = 2


@dataclass
class SamplePredictions:
    sample: str
    cell_ids: np.ndarray  # (n,) int64
    genes: list[str]
    values: np.ndarray  # (n, g) float32 log1p(counts / total * 100), clipped and rounded

    @property
    def n_rows(self) -> int:
        return len(self.cell_ids) * len(self.genes)


def finalise(values: np.ndarray, clip_max: np.ndarray | None = None) -> np.ndarray:
    """Clip to [0, clip_max] (the challenge rejects negatives), replace non-finite values by 0, round to 2 decimals."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0.0, clip_max if clip_max is not None else None)
    return np.round(values, DECIMALS)


def predict_held_out(predictor: ExpressionPredictor, store: FeatureStore, sample: Sample,
                     groups: tuple[str, ...] = HELD_OUT_GROUPS) -> SamplePredictions:
    """Every nucleus of `sample` in `groups` (default: validation and test), sorted by cell_id."""
    nuclei = store.nuclei(sample, if_changed="raise")  # cached once the sample is embedded; refused if it changed
    keep = np.flatnonzero(np.isin(sample.group_of(nuclei["cell_id"].to_numpy(np.int64)), groups))
    cell_ids, values = predictor.predict_sample(store, sample.name, nuclei, rows=keep)
    order = np.argsort(cell_ids, kind="stable")
    clip_max = getattr(predictor.estimator, "clip_max_", None)
    return SamplePredictions(sample.name, cell_ids[order], list(predictor.genes),
                             finalise(values[order], clip_max).astype(np.float32))
