"""Multi-output regressors with the scikit-learn estimator API.

`RidgeCVRegressor` never materialises more than a block of rows: it accumulates X'X, X'Y and Y'Y per fold in one
pass, then every (fold, alpha) pair is solved and scored from those d x d and d x g statistics alone. Ridge with
K-fold CV over 10^6 nuclei therefore costs about one X'X product, and its memory does not grow with n x g.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator, RegressorMixin

DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 17))  # penalty on the sum of squares: grows with n


class ClippedRegressorMixin:
    """Predictions are clipped to [0, max seen in training] per gene: the challenge rejects negatives."""

    def _set_clip(self, Y: np.ndarray) -> None:
        self.clip_max_ = np.asarray(Y, dtype=np.float32).max(axis=0)

    def _clip(self, predictions: np.ndarray) -> np.ndarray:
        return np.clip(predictions, 0.0, self.clip_max_).astype(np.float32)


def fold_statistics(X: np.ndarray, Y: np.ndarray, folds: np.ndarray, n_folds: int, block: int = 65536):
    """Per fold: n, sum x, sum y, X'X, X'Y, sum y^2 (float64) of the rows shifted by (x0, y0), streaming over blocks.

    The shift (x0, y0) is the first block's column means and is returned last. Without it, centring later as
    X'X/n - mean mean' cancels catastrophically for features that sit far from zero relative to their spread
    (RGB means near 200 with a spread of a few units, log-areas, ...): float32 products of uncentred features gave
    ridge predictions worse than the mean profile on real tissue. Products are taken in float64 for the same reason.
    """
    d, g = X.shape[1], Y.shape[1]
    head = slice(0, min(block, X.shape[0]))
    x0 = np.asarray(X[head], dtype=np.float64).mean(0)
    y0 = np.asarray(Y[head], dtype=np.float64).mean(0)
    n = np.zeros(n_folds)
    sx, sy = np.zeros((n_folds, d)), np.zeros((n_folds, g))
    xtx, xty = np.zeros((n_folds, d, d)), np.zeros((n_folds, d, g))
    syy = np.zeros(n_folds)
    for start in range(0, X.shape[0], block):
        xb = np.asarray(X[start: start + block], dtype=np.float64) - x0
        yb = np.asarray(Y[start: start + block], dtype=np.float64) - y0
        fb = folds[start: start + block]
        for k in np.unique(fb):
            rows = fb == k
            xk, yk = xb[rows], yb[rows]
            n[k] += len(xk)
            sx[k] += xk.sum(0)
            sy[k] += yk.sum(0)
            xtx[k] += xk.T @ xk
            xty[k] += xk.T @ yk
            syy[k] += float((yk * yk).sum())
    return n, sx, sy, xtx, xty, syy, (x0, y0)


def principal_basis(X: np.ndarray, n_components: int, max_rows: int, random_state: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, scale, basis d x k): the top principal axes of the standardised features, from a bounded subsample.

    A d x d eigendecomposition per CV fold costs seconds at d = 2,560 and minutes at d = 10^4; the axes of a
    subsample of rows (randomised SVD) are as good for a regression target and cost one pass.
    """
    rng = np.random.default_rng(random_state)
    rows = np.sort(rng.choice(len(X), max_rows, replace=False)) if len(X) > max_rows else slice(None)
    sample = np.asarray(X[rows], dtype=np.float64)
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


def _solve_path(n, sx, sy, xtx, xty, alphas, standardize: bool):
    """Centred (optionally standardised) ridge solutions for every alpha from sufficient statistics.

    Returns a list of (coef d x g, intercept g) in the original feature space, one per alpha.
    """
    mx, my = sx / n, sy / n
    cov = xtx / n - np.outer(mx, mx)
    cross = xty / n - np.outer(mx, my)
    scale = np.sqrt(np.clip(np.diag(cov), 1e-12, None)) if standardize else np.ones(len(mx))
    cov_s = cov / np.outer(scale, scale)
    cross_s = cross / scale[:, None]
    evals, evecs = np.linalg.eigh(cov_s)
    evals = np.clip(evals, 0, None)
    projected = evecs.T @ cross_s
    solutions = []
    for alpha in alphas:
        # Per-sample alpha: penalty alpha on the sum of squares equals alpha / n on the mean.
        coef_s = evecs @ (projected / (evals + alpha / n)[:, None])
        coef = coef_s / scale[:, None]
        solutions.append((coef, my - mx @ coef))
    return solutions


def _fold_sse(coef, intercept, n, sx, sy, xtx, xty, syy) -> float:
    """Sum of squared errors of (coef, intercept) on a fold, from the fold's statistics."""
    return float(syy - 2 * np.sum(coef * xty) - 2 * intercept @ sy + np.sum(coef * (xtx @ coef))
                 + 2 * (sx @ coef) @ intercept + n * intercept @ intercept)


class RidgeCVRegressor(ClippedRegressorMixin, RegressorMixin, BaseEstimator):
    """Multi-output ridge; alpha chosen by K-fold CV over `groups` (e.g. spatial blocks) or random folds.

    With `n_components` below the number of features, ridge runs on that many principal components of the
    standardised features (axes from at most `max_basis_rows` rows); coefficients are mapped back to the features.
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, n_folds: int = 5, standardize: bool = True,
                 n_components: int | None = None, max_basis_rows: int = 20000, random_state: int = 0):
        self.alphas, self.n_folds, self.standardize = alphas, n_folds, standardize
        self.n_components, self.max_basis_rows, self.random_state = n_components, max_basis_rows, random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        start = time.perf_counter()
        folds = self._folds(len(X), groups)
        n_folds = int(folds.max()) + 1
        reduce = self.n_components is not None and self.n_components < X.shape[1]
        if reduce:
            centre, scale, basis = principal_basis(X, self.n_components, self.max_basis_rows, self.random_state)
            X = project(X, centre, scale, basis)
        standardize = self.standardize and not reduce  # components keep their variances: ridge shrinks the small
        *stats, (x0, y0) = fold_statistics(X, Y, folds, n_folds)
        total = [s.sum(0) for s in stats]
        alphas = np.asarray(self.alphas, dtype=float)
        sse = np.zeros(len(alphas))
        if n_folds > 1:
            for k in range(n_folds):
                train = [t - s[k] for t, s in zip(total, stats)]
                for i, (coef, b) in enumerate(_solve_path(*train[:5], alphas, standardize)):
                    sse[i] += _fold_sse(coef, b, *(s[k] for s in stats))
        self.cv_mse_ = sse / (total[0] * Y.shape[1])
        self.alpha_ = float(alphas[int(np.argmin(sse))]) if n_folds > 1 else float(alphas[len(alphas) // 2])
        coef, shifted_intercept = _solve_path(*total[:5], [self.alpha_], standardize)[0]
        shifted_intercept = shifted_intercept + y0
        if reduce:  # back to the features: Z - z0 = ((X - centre) / scale) @ basis - z0
            shifted_intercept = shifted_intercept - x0 @ coef
            coef, x0 = (basis @ coef) / scale[:, None], centre
        self.coef_ = coef.astype(np.float32)
        self.intercept_ = (shifted_intercept - x0 @ coef).astype(np.float32)  # scikit-learn's meaning
        # Prediction subtracts the same shift first, for the same precision reason as the fit.
        self.x_shift_, self.shifted_intercept_ = x0.astype(np.float32), shifted_intercept.astype(np.float32)
        self._set_clip(Y)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _folds(self, n: int, groups: np.ndarray | None) -> np.ndarray:
        if groups is None:
            return np.random.default_rng(self.random_state).integers(0, self.n_folds, n)
        unique, inverse = np.unique(groups, return_inverse=True)
        shuffled = np.random.default_rng(self.random_state).permutation(len(unique))
        return (shuffled[inverse] % min(self.n_folds, len(unique))).astype(np.int64)

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
                 min_child_samples: int = 20, early_stopping_rounds: int = 30, n_jobs: int = 2,
                 random_state: int = 0):
        self.n_target_components, self.n_feature_components = n_target_components, n_feature_components
        self.n_estimators, self.learning_rate, self.num_leaves = n_estimators, learning_rate, num_leaves
        self.min_child_samples, self.early_stopping_rounds = min_child_samples, early_stopping_rounds
        self.n_jobs, self.random_state = n_jobs, random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        import lightgbm as lgb

        start = time.perf_counter()
        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.x_mean_, self.x_scale_ = X.mean(0), X.std(0) + 1e-6
        Xs = (X - self.x_mean_) / self.x_scale_
        self.x_components_ = _top_components(Xs, self.n_feature_components)
        Z = Xs @ self.x_components_ if self.x_components_ is not None else Xs
        self.y_mean_ = Y.mean(0)
        self.y_components_ = _top_components(Y - self.y_mean_, self.n_target_components)
        T = (Y - self.y_mean_) @ self.y_components_
        rng = np.random.default_rng(self.random_state)
        if groups is not None:
            unique = np.unique(groups)
            valid = np.isin(groups, rng.choice(unique, size=max(len(unique) // 5, 1), replace=False))
        else:
            valid = rng.random(len(X)) < 0.2
        self.boosters_ = []
        for j in range(T.shape[1]):
            model = lgb.LGBMRegressor(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                                      num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
                                      subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                                      n_jobs=self.n_jobs, random_state=self.random_state, verbose=-1)
            with warnings.catch_warnings():  # lightgbm's own deprecation notices about sklearn internals
                warnings.simplefilter("ignore")
                model.fit(Z[~valid], T[~valid, j], eval_set=[(Z[valid], T[valid, j])],
                          callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)])
            self.boosters_.append(model)
        self._set_clip(Y)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        Xs = (np.asarray(X, dtype=np.float32) - self.x_mean_) / self.x_scale_
        Z = Xs @ self.x_components_ if self.x_components_ is not None else Xs
        T = np.column_stack([b.predict(Z) for b in self.boosters_])
        return self._clip(self.y_mean_ + T @ self.y_components_.T)


def _top_components(M: np.ndarray, k: int | None) -> np.ndarray | None:
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
