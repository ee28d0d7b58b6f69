"""The baselines: the mean profile (the floor every model must beat) and pure spatial smoothing."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from regress.estimator import ExpressionRegressor, Integral, Interval
from regress.ridge import MomentStats


class MeanProfile(ExpressionRegressor):
    """Every nucleus gets the mean expression profile of the training nuclei."""

    _parameter_constraints: dict = {}

    def fit(self, X, Y, groups=None):
        X, Y = self._fit_data(X, Y)
        self.mean_ = np.asarray(Y, dtype=np.float32).mean(0)
        self._set_clip(Y)
        return self

    def fit_statistics(self, stats: list[MomentStats], groups: np.ndarray | None = None,
                       scoring_rows: Callable | None = None):
        """The same from the training strata's statistics (`regress.families.StatisticsTrained`)."""
        total = MomentStats.combine(stats)
        self.mean_, self.clip_max_ = total.mean_y.astype(np.float32), total.y_max.astype(np.float32)
        self.y_ndim_ = 2  # reads no feature: any number of columns is served
        return self

    def predict(self, X):
        X = self._predict_data(X)
        return self._clip(np.tile(self.mean_, (len(X), 1)))


class SpatialKNNProfile(ExpressionRegressor):
    """Pure spatial smoothing: the mean profile of the k nearest training nuclei.

    X holds positions; the engine gives (y, x) with every sample far apart on the x axis, so nuclei of different
    samples never meet (`regress.families.InputLayout.take`).
    """

    _parameter_constraints = {"k": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, k: int = 20):
        self.k = k

    def fit(self, X, Y, groups=None):
        X, Y = self._fit_data(X, Y)
        self.tree_ = cKDTree(np.asarray(X, dtype=np.float64))
        self.Y_ = np.asarray(Y, dtype=np.float32)
        self._set_clip(Y)
        return self

    def predict(self, X):
        X = self._predict_data(X)
        _, idx = self.tree_.query(np.asarray(X, dtype=np.float64), k=min(self.k, len(self.Y_)))
        idx = idx.reshape(len(X), -1)
        return self._clip(self.Y_[idx].mean(axis=1))
