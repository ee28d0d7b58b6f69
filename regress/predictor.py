"""A fitted model with everything needed to predict again: feature spec, estimator, genes, encoder settings."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from regress.features import FeatureSpec, sample_features
from slidedata.errors import DataError
from slidedata.feature_store import FeatureStore

PREDICTOR_FILE = "predictor.joblib"
SUMMARY_FILE = "predictor.json"


@dataclass
class ExpressionPredictor:
    model_name: str
    feature_spec: FeatureSpec
    estimator: object  # fitted, with predict(X) -> (n, genes), clipped to the valid range
    genes: list[str]
    embed_settings: dict = field(default_factory=dict)  # patch sizes, pad mode... to re-embed new samples alike
    scores: dict = field(default_factory=dict)  # held-out scores from the evaluation that chose this model
    # The settings of the cache entries it was trained on ('encoder:patch_size' -> settings_of(attrs)): features
    # made otherwise are refused at prediction. Empty for models saved before this was recorded.
    feature_settings: dict = field(default_factory=dict)

    def predict_features(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict(X)

    def predict_sample(self, store: FeatureStore, sample_name: str,
                       nuclei: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cell_ids, predictions) for every nucleus of a cached sample, in the cache's order."""
        nuclei = store.read_nuclei(sample_name) if nuclei is None else nuclei
        store.check_settings(sample_name, getattr(self, "feature_settings", {}))
        X = sample_features(store, sample_name, self.feature_spec, nuclei)
        return nuclei["cell_id"].to_numpy(np.int64), self.predict_features(X)

    def save(self, directory: str | Path) -> Path:
        """Write atomically (temporary name, then rename) with a readable JSON summary beside it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{PREDICTOR_FILE}.tmp"
        joblib.dump(self, tmp)
        os.replace(tmp, directory / PREDICTOR_FILE)
        summary = {"model": self.model_name, "features": asdict(self.feature_spec), "n_genes": len(self.genes),
                   "embed_settings": self.embed_settings, "feature_settings": self.feature_settings,
                   "scores": self.scores,
                   "estimator": repr(self.estimator)}
        (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        return directory / PREDICTOR_FILE

    @classmethod
    def load(cls, directory: str | Path) -> "ExpressionPredictor":
        path = Path(directory) / PREDICTOR_FILE
        if not path.exists():
            raise DataError(path, "-", "no fitted model here; run the fit stage (make fit) first")
        predictor = joblib.load(path)
        if not isinstance(predictor, cls):
            raise DataError(path, "-", f"holds a {type(predictor).__name__}, not an ExpressionPredictor")
        return predictor
