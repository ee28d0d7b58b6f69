"""The ridge family: multi-output ridge trained from streamed sufficient statistics, its alpha chosen by its own
cross-validation over whole groups (samples or spatial blocks).

`RidgeCVRegressor` never materialises more than a block of rows: it gathers the centred sufficient statistics
(`MomentStats`) of each fold in one pass, then every (fold, alpha) pair is solved and scored from those d x d and
d x g statistics alone. Ridge with K-fold CV over 10^6 nuclei therefore costs about one X'X product, its memory does
not grow with n x g, and the statistics can be gathered anywhere (sample by sample, on Dask workers) and combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.utils._param_validation import StrOptions

from regress.components import column_scale, principal_axes
from regress.estimator import ExpressionRegressor, Integral, Interval, Real, check_parameters
from regress.metrics import cellwise_spearman
from regress.splits import group_folds, row_folds

DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 17))  # penalty on the sum of squares: grows with n


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

    def select(self, columns: slice | np.ndarray) -> "MomentStats":
        """The statistics of some features only (a slice or the indices of the columns a model reads)."""
        xx = self.xx[columns, columns] if isinstance(columns, slice) else self.xx[np.ix_(columns, columns)]
        return MomentStats(self.n, self.mean_x[columns], self.mean_y, xx, self.xy[columns], self.yy, self.y_max)


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


class RidgeCVRegressor(ExpressionRegressor):
    """Multi-output ridge; alpha chosen by K-fold CV over `groups` (e.g. spatial blocks) or random folds.

    With `n_components` below the number of features, ridge runs on that many principal components of the
    standardised features (exact axes, from the statistics); coefficients are mapped back to the features.
    `scale_sets` (a set id per feature) standardises the columns of one set by one common scale (`column_scale`).
    """

    _parameter_constraints = {
        "alphas": ["array-like"], "n_folds": [Interval(Integral, 1, None, closed="left")], "standardize": ["boolean"],
        "n_components": [Interval(Integral, 1, None, closed="left"), None], "scale_sets": ["array-like", None],
        "random_state": [Interval(Integral, 0, None, closed="left")], "criterion": [StrOptions(set(ALPHA_CRITERIA))],
    }
    _element_constraints = {"alphas": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, alphas=DEFAULT_ALPHAS, n_folds: int = 5, standardize: bool = True,
                 n_components: int | None = None, scale_sets: np.ndarray | None = None, random_state: int = 0,
                 criterion: str = "mse"):
        self.alphas, self.n_folds, self.standardize = alphas, n_folds, standardize
        self.n_components, self.scale_sets, self.random_state = n_components, scale_sets, random_state
        self.criterion = criterion  # 'mse' | 'spearman': what alpha is chosen by (ALPHA_CRITERIA)

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        X, Y = self._fit_data(X, Y)
        folds = row_folds(len(X), groups, self.n_folds, self.random_state)
        labels = np.unique(folds)
        rows = [(X[folds == k], Y[folds == k]) for k in labels] if self.criterion == "spearman" else None
        return self._fit_folds([MomentStats.of(X[folds == k], Y[folds == k]) for k in labels], rows)

    def fit_statistics(self, stats: list[MomentStats], groups: np.ndarray,
                       scoring_rows: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]):
        """Fit from streamed statistics (`regress.families.StatisticsTrained`): `stats` of each stratum, `groups`
        its tuning label (sample or block). Whole groups are assigned to `n_folds` folds at random; under the
        'spearman' criterion, `scoring_rows(positions of a fold's strata)` gives some of its rows (X, Y) to score.
        """
        check_parameters(self)
        fold_of = group_folds(groups, self.n_folds, self.random_state)
        folds: dict = {}
        members: dict = {}
        for position, (part, label) in enumerate(zip(stats, np.asarray(groups).tolist())):
            folds.setdefault(fold_of[label], []).append(part)
            members.setdefault(fold_of[label], []).append(position)
        held = [scoring_rows(members[k]) for k in sorted(folds)] if self.criterion == "spearman" else None
        self.y_ndim_ = 2
        self.n_features_in_ = len(stats[0].mean_x)
        return self._fit_folds([MomentStats.combine(folds[k]) for k in sorted(folds)], held)

    def _fit_folds(self, folds: list[MomentStats], held_rows: list[tuple[np.ndarray, np.ndarray]] | None = None):
        """Fit from the statistics of each cross-validation fold: alpha minimises the summed held-out error over the
        folds (criterion 'mse'), or maximises the held-out cell-wise Spearman of `held_rows` (criterion 'spearman':
        some rows (X, Y) of each fold, in the folds' order), then ridge is solved on all of them.

        With `n_components`, the principal axes of the standardised features come from the covariance of all the
        folds' rows (exact, and from the statistics alone: no pass over the rows), and every fold's statistics are
        projected onto them.
        """
        total = MomentStats.combine(folds)
        centre, standardize, basis, sets = total.mean_x, self.standardize, None, self.scale_sets
        if self.n_components is not None and self.n_components < len(centre):
            scale = column_scale(np.diag(total.xx) / total.n, self.scale_sets)
            # component = (x - centre) @ basis
            basis = principal_axes(None, self.n_components, gram=total.xx / np.outer(scale, scale)) / scale[:, None]
            folds = [f.project(centre, basis) for f in folds]
            total = MomentStats.combine(folds)
            standardize, sets = False, None  # components keep their variances: ridge shrinks the small ones
        alphas = np.asarray(self.alphas, dtype=float)
        sse, spearman, scored = np.zeros(len(alphas)), np.zeros(len(alphas)), 0
        by_score = self.criterion == "spearman" and held_rows is not None
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

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._predict_data(X)
        return self._clip((np.asarray(X, dtype=np.float32) - self.x_shift_) @ self.coef_ + self.shifted_intercept_)


def settings_parameters(settings) -> dict:
    """Ridge's parameters that the fit stage's settings hold as their own options (`--pca`, `--ridge-criterion`)."""
    return {"alphas": settings.ridge_alphas, "n_folds": settings.n_folds, "n_components": settings.ridge_components,
            "criterion": settings.ridge_criterion}
