"""The LightGBM family: gradient-boosted trees on the top principal components of the targets."""

from __future__ import annotations

import os
import warnings

import numpy as np

from regress.components import ComponentInputs, top_components
from regress.estimator import ExpressionRegressor, Integral, Interval, Real
from regress.splits import tuning_split

ROWS_PER_THREAD = 20_000


def lightgbm_threads(n_rows: int) -> int:
    """Threads for LightGBM: the cores this process may use, but one per ROWS_PER_THREAD rows at most. On small data
    a second OpenMP thread only waits: on a loaded 2-core machine a 2,400-row fit took 108 s with 2 threads and
    11 s with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_rows // ROWS_PER_THREAD))


class LightGBMRegressor(ExpressionRegressor):
    """LightGBM on the top principal components of the (centred) targets, mapped back to all genes.

    460 per-gene boosters would cost 460 times one booster; the expression of a nucleus lies close to a low-dimensional
    subspace (cell types and programmes), so `n_target_components` boosters recover most of the signal.
    Each booster stops early on a held-out fold (by `groups` when given, so spatially separate). The features are
    read as `ComponentInputs` (standardised, on their top axes; no common scale: trees need none).
    """

    _parameter_constraints = {
        "n_target_components": [Interval(Integral, 1, None, closed="left")],
        "n_feature_components": [Interval(Integral, 1, None, closed="left"), None],
        "n_estimators": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "num_leaves": [Interval(Integral, 2, None, closed="left")],
        "min_child_samples": [Interval(Integral, 1, None, closed="left")],
        "early_stopping_rounds": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [Integral, None], "scale_sets": ["array-like", None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, n_target_components: int = 16, n_feature_components: int | None = 64,
                 n_estimators: int = 400, learning_rate: float = 0.05, num_leaves: int = 31,
                 min_child_samples: int = 20, early_stopping_rounds: int = 30, n_jobs: int | None = None,
                 scale_sets: np.ndarray | None = None, random_state: int = 0):
        self.n_target_components, self.n_feature_components = n_target_components, n_feature_components
        self.scale_sets = scale_sets  # as RidgeCVRegressor's: a reduced block is scaled as one group
        self.n_estimators, self.learning_rate, self.num_leaves = n_estimators, learning_rate, num_leaves
        self.min_child_samples, self.early_stopping_rounds = min_child_samples, early_stopping_rounds
        self.n_jobs, self.random_state = n_jobs, random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        import lightgbm as lgb

        X, Y = self._fit_data(X, Y)
        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.inputs_ = ComponentInputs.fit(X, self.n_feature_components, self.scale_sets, rescale=False)
        Z = self.inputs_.transform(X)
        self.y_mean_ = Y.mean(0)
        self.y_components_ = top_components(Y - self.y_mean_, self.n_target_components)
        T = (Y - self.y_mean_) @ self.y_components_
        valid = tuning_split(len(X), groups, self.random_state)
        self.boosters_ = []
        for j in range(T.shape[1]):
            model = lgb.LGBMRegressor(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                                      num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
                                      subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                                      n_jobs=self.n_jobs or lightgbm_threads(len(Z)), random_state=self.random_state,
                                      verbose=-1)
            with warnings.catch_warnings():  # lightgbm's own deprecation notices about sklearn internals
                warnings.simplefilter("ignore")
                model.fit(Z[~valid], T[~valid, j], eval_set=[(Z[valid], T[valid, j])],
                          callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
            self.boosters_.append(model)
        self._set_clip(Y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._predict_data(X)
        Z = self.inputs_.transform(X)
        T = np.column_stack([b.predict(Z) for b in self.boosters_])
        return self._clip(self.y_mean_ + T @ self.y_components_.T)
