"""A fitted model with everything needed to predict again: feature spec, estimator, genes, encoder settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from regress.features import FeatureReducer, FeatureSpec, sample_features
from slidedata.feature_store import FeatureStore

# The saved format (regress.model_format): 1 since models record it; older ones load through its migration.
FORMAT_VERSION = 1


@dataclass
class ExpressionPredictor:
    model_name: str
    feature_spec: FeatureSpec
    estimator: object  # fitted, with predict(X) -> (n, genes), clipped to the valid range
    genes: list[str]
    embed_settings: dict = field(default_factory=dict)  # encoder, pad mode, pixel size... to re-embed new samples alike
    scores: dict = field(default_factory=dict)  # held-out scores from the evaluation that chose this model
    # The settings of the cache entries it was trained on ('encoder:patch_size' -> settings_of(attrs)): features
    # made otherwise are refused at prediction.
    feature_settings: dict = field(default_factory=dict)
    reducer: FeatureReducer | None = None  # the principal axes of the wide feature blocks, fitted with the model
    data: str = ""  # the data folder it was fitted on (absolute)
    format_version: int = FORMAT_VERSION

    def predict_features(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict(X)

    def predict_sample(self, store: FeatureStore, sample_name: str, nuclei: pd.DataFrame | None = None,
                       rows: np.ndarray | None = None, block: int = 20000) -> tuple[np.ndarray, np.ndarray]:
        """(cell_ids, predictions) of the nuclei `rows` (default: all) of a cached sample, in the cache's order.

        The features of every nucleus are built (context reads the neighbours), but only `rows` are predicted, a
        block at a time: at submission the train nuclei cost no prediction memory.
        """
        nuclei = store.read_nuclei(sample_name) if nuclei is None else nuclei
        store.check_settings(sample_name, self.feature_settings)
        X = sample_features(store, sample_name, self.feature_spec, nuclei, self.reducer)
        rows = np.arange(len(nuclei)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows), len(self.genes)), dtype=np.float32)
        for start in range(0, len(rows), block):
            out[start: start + block] = self.predict_features(X[rows[start: start + block]])
        return nuclei["cell_id"].to_numpy(np.int64)[rows], out

    def summary(self) -> dict:
        """What `predictor.json` shows of the model (for people; nothing loads it)."""
        return {"model": self.model_name, "data": self.data, "format_version": self.format_version, "features": self.feature_spec.as_dict(),
                "n_genes": len(self.genes), "genes": list(self.genes),
                "embed_settings": self.embed_settings, "feature_settings": self.feature_settings,
                "scores": self.scores, "estimator": repr(self.estimator)}

