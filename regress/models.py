"""Multi-output regressors with the scikit-learn estimator API.

`RidgeCVRegressor` never materialises more than a block of rows: it gathers the centred sufficient statistics
(`MomentStats`) of each fold in one pass, then every (fold, alpha) pair is solved and scored from those d x d and
d x g statistics alone. Ridge with K-fold CV over 10^6 nuclei therefore costs about one X'X product, its memory does
not grow with n x g, and the statistics can be gathered anywhere (sample by sample, on Dask workers) and combined.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator, RegressorMixin

from regress.metrics import cellwise_spearman

DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 17))  # penalty on the sum of squares: grows with n


class ClippedRegressorMixin:
    """Predictions are clipped to [0, max seen in training] per gene: the challenge rejects negatives."""

    def _set_clip(self, Y: np.ndarray) -> None:
        self.clip_max_ = np.asarray(Y, dtype=np.float32).max(axis=0)

    def _clip(self, predictions: np.ndarray) -> np.ndarray:
        return np.clip(predictions, 0.0, self.clip_max_).astype(np.float32)


@dataclass
class MomentStats:
    """Sufficient statistics of ridge for one group of rows, centred at the group's own means (float64).

    n, the means of x and y, X'X and X'Y of the centred rows and the centred sum of squares of y: any union of groups
    (a fold, a split, all training rows) follows exactly from these by the parallel-variance formula, so one pass over
    the data serves every fold, split and alpha, wherever the groups were computed (a process, a Dask worker).
    Centring per group is what keeps this exact: X'X/n - mean mean' of uncentred float32 products cancelled
    catastrophically for features far from zero relative to their spread (RGB means near 200, log-areas), and ridge
    then predicted worse than the mean profile on real tissue.
    """

    n: float
    mean_x: np.ndarray  # (d,)
    mean_y: np.ndarray  # (g,)
    xx: np.ndarray  # (d, d) sum of (x - mean_x)(x - mean_x)'
    xy: np.ndarray  # (d, g) sum of (x - mean_x)(y - mean_y)'
    yy: float  # sum of |y - mean_y|^2
    y_max: np.ndarray  # (g,) per-gene maximum (the clipping range)

    @classmethod
    def of(cls, X: np.ndarray, Y: np.ndarray, block: int = 65536) -> "MomentStats":
        """Statistics of the rows of (X, Y), a block of rows at a time in float64."""
        n = X.shape[0]
        mean_x = np.zeros(X.shape[1])
        mean_y = np.zeros(Y.shape[1])
        for start in range(0, n, block):
            mean_x += np.asarray(X[start: start + block], dtype=np.float64).sum(0)
            mean_y += np.asarray(Y[start: start + block], dtype=np.float64).sum(0)
        mean_x, mean_y = mean_x / max(n, 1), mean_y / max(n, 1)
        xx, xy, yy = np.zeros((X.shape[1], X.shape[1])), np.zeros((X.shape[1], Y.shape[1])), 0.0
        y_max = np.full(Y.shape[1], -np.inf, dtype=np.float32)
        for start in range(0, n, block):
            xb = np.asarray(X[start: start + block], dtype=np.float64) - mean_x
            yb = np.asarray(Y[start: start + block], dtype=np.float64) - mean_y
            xx += xb.T @ xb
            xy += xb.T @ yb
            yy += float((yb * yb).sum())
            y_max = np.maximum(y_max, np.asarray(Y[start: start + block], dtype=np.float32).max(0))
        return cls(float(n), mean_x, mean_y, xx, xy, yy, y_max)

    @classmethod
    def by_group(cls, X: np.ndarray, Y: np.ndarray, labels: np.ndarray) -> dict:
        """{label: statistics of the rows with that label}."""
        return {label: cls.of(X[labels == label], Y[labels == label]) for label in np.unique(labels)}

    @classmethod
    def combine(cls, parts: list["MomentStats"]) -> "MomentStats":
        """The statistics of the union of the groups (Chan et al.'s parallel update, exact)."""
        parts = [p for p in parts if p.n > 0]
        if not parts:
            raise ValueError("no rows to combine")
        n = sum(p.n for p in parts)
        mean_x = sum(p.n * p.mean_x for p in parts) / n
        mean_y = sum(p.n * p.mean_y for p in parts) / n
        xx, xy, yy = np.zeros_like(parts[0].xx), np.zeros_like(parts[0].xy), 0.0
        for p in parts:
            dx, dy = p.mean_x - mean_x, p.mean_y - mean_y
            xx += p.xx + p.n * np.outer(dx, dx)
            xy += p.xy + p.n * np.outer(dx, dy)
            yy += p.yy + p.n * float(dy @ dy)
        return cls(n, mean_x, mean_y, xx, xy, yy, np.max([p.y_max for p in parts], axis=0))

    def project(self, centre: np.ndarray, basis: np.ndarray) -> "MomentStats":
        """The statistics of the rows mapped to (x - centre) @ basis (e.g. principal components)."""
        return MomentStats(self.n, (self.mean_x - centre) @ basis, self.mean_y, basis.T @ self.xx @ basis,
                           basis.T @ self.xy, self.yy, self.y_max)

    def columns(self, count: int) -> "MomentStats":
        """The statistics of the first `count` features only (e.g. a model without the context block)."""
        return MomentStats(self.n, self.mean_x[:count], self.mean_y, self.xx[:count, :count], self.xy[:count],
                           self.yy, self.y_max)


def principal_basis(X: np.ndarray, n_components: int, random_state: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, scale, basis d x k): the top principal axes of the standardised rows of X (a bounded subsample).

    A d x d eigendecomposition per CV fold costs seconds at d = 2,560 and minutes at d = 10^4; the axes of a
    subsample of rows (randomised SVD) are as good for a regression target and cost one pass.
    """
    sample = np.asarray(X, dtype=np.float64)
    centre, scale = sample.mean(0), sample.std(0)
    scale[scale < 1e-12] = 1.0
    standardized = (sample - centre) / scale
    if min(standardized.shape) <= 2048:  # exact where it is cheap
        vt = np.linalg.svd(standardized, full_matrices=False)[2][:n_components]
    else:
        from sklearn.utils.extmath import randomized_svd

        vt = randomized_svd(standardized, n_components, n_iter=7, random_state=random_state)[2]
    return centre, scale, vt.T


def project(X: np.ndarray, centre: np.ndarray, scale: np.ndarray, basis: np.ndarray, block: int = 65536
            ) -> np.ndarray:
    """((X - centre) / scale) @ basis, a block of rows at a time, as float32."""
    out = np.empty((X.shape[0], basis.shape[1]), dtype=np.float32)
    for start in range(0, X.shape[0], block):
        rows = np.asarray(X[start: start + block], dtype=np.float64)
        out[start: start + block] = ((rows - centre) / scale) @ basis
    return out


def column_scale(variances: np.ndarray, sets: np.ndarray | None = None) -> np.ndarray:
    """Standard deviation per column, or, for columns in one group, the root mean variance of the group.

    A block reduced to principal components (`FeatureReducer`) is one group: scaling its components one by one would
    blow its smallest directions up to the weight of its largest; a common scale keeps the geometry the block's
    standardised features had.
    """
    variances = np.clip(np.asarray(variances, dtype=np.float64), 1e-12, None)
    if sets is None:
        return np.sqrt(variances)
    sets = np.asarray(sets)
    mean = np.bincount(sets, weights=variances) / np.bincount(sets)
    return np.sqrt(mean[sets])


def ridge_path(stats: MomentStats, alphas, standardize: bool, scale_sets: np.ndarray | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge solutions (coef d x g, intercept g) for every alpha from a training group's statistics.

    Alpha penalises the sum of squares: it is the same alpha whatever the number of rows, as in scikit-learn.
    """
    cov, cross = stats.xx / stats.n, stats.xy / stats.n
    scale = column_scale(np.diag(cov), scale_sets) if standardize else np.ones(len(stats.mean_x))
    evals, evecs = np.linalg.eigh(cov / np.outer(scale, scale))
    evals = np.clip(evals, 0, None)
    projected = evecs.T @ (cross / scale[:, None])
    solutions = []
    for alpha in alphas:
        coef = evecs @ (projected / (evals + alpha / stats.n)[:, None]) / scale[:, None]
        solutions.append((coef, stats.mean_y - stats.mean_x @ coef))
    return solutions


def sum_squared_error(coef: np.ndarray, intercept: np.ndarray, stats: MomentStats) -> float:
    """Sum over the group's rows of |y - intercept - x coef|^2, from its statistics alone."""
    offset = stats.mean_y - intercept - stats.mean_x @ coef
    return float(stats.yy - 2 * np.sum(coef * stats.xy) + np.sum(coef * (stats.xx @ coef))
                 + stats.n * offset @ offset)


ALPHA_CRITERIA = ("mse", "spearman")


def ridge_fold_of(groups: np.ndarray, n_folds: int, random_state: int = 0) -> dict:
    """{group label: fold}: whole groups (samples, spatial blocks) are assigned to folds at random."""
    unique = np.unique(groups)
    shuffled = np.random.default_rng(random_state).permutation(len(unique))
    return dict(zip(unique.tolist(), (shuffled % min(n_folds, len(unique))).tolist()))


class RidgeCVRegressor(ClippedRegressorMixin, RegressorMixin, BaseEstimator):
    """Multi-output ridge; alpha chosen by K-fold CV over `groups` (e.g. spatial blocks) or random folds.

    With `n_components` below the number of features, ridge runs on that many principal components of the
    standardised features (exact axes, from the statistics); coefficients are mapped back to the features.
    `scale_sets` (a set id per feature) standardises the columns of one set by one common scale (`column_scale`).
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, n_folds: int = 5, standardize: bool = True,
                 n_components: int | None = None, scale_sets: np.ndarray | None = None, random_state: int = 0,
                 criterion: str = "mse"):
        self.alphas, self.n_folds, self.standardize = alphas, n_folds, standardize
        self.n_components, self.scale_sets, self.random_state = n_components, scale_sets, random_state
        self.criterion = criterion  # 'mse' | 'spearman': what alpha is chosen by (ALPHA_CRITERIA)

    criterion = "mse"  # what models pickled before the choice existed were fitted with

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        folds = self._folds(len(X), groups)
        labels = np.unique(folds)
        rows = [(X[folds == k], Y[folds == k]) for k in labels] if self.criterion == "spearman" else None
        self.fit_statistics([MomentStats.of(X[folds == k], Y[folds == k]) for k in labels], rows)
        return self

    def fit_statistics(self, folds: list[MomentStats], held_rows: list[tuple[np.ndarray, np.ndarray]] | None = None):
        """Fit from the statistics of each cross-validation fold (whole samples or blocks): alpha minimises the
        summed held-out error over the folds (criterion 'mse'), or maximises the held-out cell-wise Spearman of
        `held_rows` (criterion 'spearman': some rows (X, Y) of each fold, in the folds' order), then ridge is solved
        on all of them. The streamed fit stage calls this with statistics gathered sample by sample and rows from
        its bounded subsample; `fit` with those of in-memory rows.

        With `n_components`, the principal axes of the standardised features come from the covariance of all the
        folds' rows (exact, and from the statistics alone: no pass over the rows), and every fold's statistics are
        projected onto them.
        """
        total = MomentStats.combine(folds)
        centre, standardize, basis, sets = total.mean_x, self.standardize, None, self.scale_sets
        if self.n_components is not None and self.n_components < len(centre):
            scale = column_scale(np.diag(total.xx) / total.n, self.scale_sets)
            _, evecs = np.linalg.eigh(total.xx / np.outer(scale, scale))
            basis = evecs[:, ::-1][:, : self.n_components] / scale[:, None]  # component = (x - centre) @ basis
            folds = [f.project(centre, basis) for f in folds]
            total = MomentStats.combine(folds)
            standardize, sets = False, None  # components keep their variances: ridge shrinks the small ones
        alphas = np.asarray(self.alphas, dtype=float)
        sse, spearman, scored = np.zeros(len(alphas)), np.zeros(len(alphas)), 0
        by_score = self.criterion == "spearman" and held_rows is not None
        if self.criterion not in ALPHA_CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(ALPHA_CRITERIA)}, got {self.criterion!r}")
        if len(folds) > 1:
            for k, held in enumerate(folds):
                train = MomentStats.combine(folds[:k] + folds[k + 1:])
                if by_score:
                    rows_x, rows_y = held_rows[k]
                    rows_x = np.asarray(rows_x, np.float64) - centre
                    rows_x = rows_x @ basis if basis is not None else rows_x
                    scored += len(rows_y)
                for i, (coef, intercept) in enumerate(ridge_path(train, alphas, standardize, sets)):
                    sse[i] += sum_squared_error(coef, intercept, held)
                    if by_score and len(rows_y):
                        predicted = np.clip(rows_x @ coef + intercept + (centre @ coef if basis is None else 0), 0,
                                            None)
                        spearman[i] += cellwise_spearman(rows_y, predicted).sum()
        self.cv_mse_ = sse / (total.n * len(total.mean_y))
        self.cv_spearman_ = spearman / scored if by_score and scored else None
        if len(folds) < 2:
            self.alpha_ = float(alphas[len(alphas) // 2])
        elif self.cv_spearman_ is not None:
            self.alpha_ = float(alphas[int(np.argmax(self.cv_spearman_))])
        else:
            self.alpha_ = float(alphas[int(np.argmin(sse))])
        coef, intercept = ridge_path(total, [self.alpha_], standardize, sets)[0]
        # prediction = shifted_intercept + (x - centre) @ coef: subtracting the training mean first keeps the
        # precision of features far from zero in float32 (components are centred already)
        shifted_intercept = intercept if basis is not None else intercept + centre @ coef
        if basis is not None:  # back to the features
            coef = basis @ coef
        self.coef_ = coef.astype(np.float32)
        self.x_shift_, self.shifted_intercept_ = centre.astype(np.float32), shifted_intercept.astype(np.float32)
        self.intercept_ = (shifted_intercept - centre @ coef).astype(np.float32)  # scikit-learn's meaning
        self.clip_max_ = total.y_max.astype(np.float32)
        return self

    def _folds(self, n: int, groups: np.ndarray | None) -> np.ndarray:
        if groups is None:
            return np.random.default_rng(self.random_state).integers(0, self.n_folds, n)
        fold_of = ridge_fold_of(groups, self.n_folds, self.random_state)
        return np.array([fold_of[g] for g in np.asarray(groups).tolist()], dtype=np.int64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._clip((np.asarray(X, dtype=np.float32) - self.x_shift_) @ self.coef_ + self.shifted_intercept_)


class LightGBMRegressor(ClippedRegressorMixin, RegressorMixin, BaseEstimator):
    """LightGBM on the top principal components of the (centred) targets, mapped back to all genes.

    460 per-gene boosters would cost 460 times one booster; the expression of a nucleus lies close to a low-dimensional
    subspace (cell types and programmes), so `n_target_components` boosters recover most of the signal.
    Each booster stops early on a held-out fold (by `groups` when given, so spatially separate).
    """

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

        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.x_mean_ = X.mean(0)
        self.x_scale_ = (column_scale(X.var(0), self.scale_sets) + 1e-6).astype(np.float32)
        Xs = (X - self.x_mean_) / self.x_scale_
        self.x_components_ = top_components(Xs, self.n_feature_components)
        Z = Xs @ self.x_components_ if self.x_components_ is not None else Xs
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
        Xs = (np.asarray(X, dtype=np.float32) - self.x_mean_) / self.x_scale_
        Z = Xs @ self.x_components_ if self.x_components_ is not None else Xs
        T = np.column_stack([b.predict(Z) for b in self.boosters_])
        return self._clip(self.y_mean_ + T @ self.y_components_.T)


ROWS_PER_THREAD = 20_000


def tuning_split(n_rows: int, groups: np.ndarray | None, random_state: int = 0) -> np.ndarray:
    """Rows held out to tune a row-trained model (early stopping, a grid): a fifth of the groups (whole samples or
    blocks, at least one) when `groups` is given, else a random fifth of the rows."""
    rng = np.random.default_rng(random_state)
    if groups is not None and len(np.unique(groups)) > 1:  # one group cannot be both trained on and held out
        unique = np.unique(groups)
        return np.isin(groups, rng.choice(unique, size=max(len(unique) // 5, 1), replace=False))
    return rng.random(n_rows) < 0.2


def scored_rows(candidates: np.ndarray, max_rows: int, random_state: int = 0) -> np.ndarray:
    """At most `max_rows` of the row indices `candidates`, drawn at random and sorted: the held-out rows a tuning
    step scores by the cell-wise Spearman (ranking every gene of every row costs)."""
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(candidates, size=min(max_rows, len(candidates)), replace=False))


def lightgbm_threads(n_rows: int) -> int:
    """Threads for LightGBM: the cores this process may use, but one per ROWS_PER_THREAD rows at most. On small data
    a second OpenMP thread only waits: on a loaded 2-core machine a 2,400-row fit took 108 s with 2 threads and
    11 s with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_rows // ROWS_PER_THREAD))


@dataclass
class ComponentInputs:
    """What a row-trained network or classifier reads: the standardised features (a reduced block scaled as one,
    `column_scale`) projected onto their top principal axes, all divided by one common scale so that a penalty or a
    learning rate means the same on any data."""

    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray | None
    common_scale: float

    @classmethod
    def fit(cls, X: np.ndarray, n_components: int | None, scale_sets: np.ndarray | None = None
            ) -> "ComponentInputs":
        X = np.asarray(X, dtype=np.float32)
        mean = X.mean(0)
        scale = (column_scale(X.var(0), scale_sets) + 1e-6).astype(np.float32)
        standardised = (X - mean) / scale
        axes = top_components(standardised, n_components)
        projected = standardised @ axes if axes is not None else standardised
        return cls(mean, scale, axes, float(projected.std() + 1e-6))

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float32) - self.mean) / self.scale
        return ((Z @ self.axes if self.axes is not None else Z) / np.float32(self.common_scale)).astype(np.float32)


def top_components(M: np.ndarray, k: int | None) -> np.ndarray | None:
    """Top-k right singular vectors (columns) of a centred matrix, via the d x d covariance."""
    if k is None or k >= M.shape[1]:
        return None if k is None else np.eye(M.shape[1], dtype=np.float32)
    evals, evecs = np.linalg.eigh((M.T @ M).astype(np.float64))
    return evecs[:, ::-1][:, :k].astype(np.float32)


class MeanProfile(ClippedRegressorMixin, RegressorMixin, BaseEstimator):
    """Baseline: every nucleus gets the mean expression profile of the training nuclei."""

    def fit(self, X, Y, groups=None):
        self.mean_ = np.asarray(Y, dtype=np.float32).mean(0)
        self._set_clip(Y)
        return self

    def fit_statistics(self, stats: MomentStats):
        """The same from the training rows' statistics (the streamed fit stage)."""
        self.mean_, self.clip_max_ = stats.mean_y.astype(np.float32), stats.y_max.astype(np.float32)
        return self

    def predict(self, X):
        return self._clip(np.tile(self.mean_, (len(X), 1)))


class SpatialKNNProfile(ClippedRegressorMixin, RegressorMixin, BaseEstimator):
    """Baseline (pure spatial smoothing): the mean profile of the k nearest training nuclei.

    X holds coordinates (y, x) plus a sample code in a third column, so nuclei of different samples never meet.
    """

    def __init__(self, k: int = 20):
        self.k = k

    def fit(self, X, Y, groups=None):
        self.tree_ = cKDTree(self._points(X))
        self.Y_ = np.asarray(Y, dtype=np.float32)
        self._set_clip(Y)
        return self

    def predict(self, X):
        _, idx = self.tree_.query(self._points(X), k=min(self.k, len(self.Y_)))
        idx = idx.reshape(len(X), -1)
        return self._clip(self.Y_[idx].mean(axis=1))

    @staticmethod
    def _points(X):
        X = np.asarray(X, dtype=np.float64)
        return np.c_[X[:, 0], X[:, 1] + X[:, 2] * 1e9]  # samples far apart on the x axis
