"""Predictions in expression-state space: what a cell looks like is a guess at which state it is in.

The challenge's metric ranks the genes within each cell. A measured cell is sparse, with the co-expression of real
cells; a regression's output is a smooth blend that ranks genes the way no real cell does. `ExpressionStates`
clusters the training cells' measured expression (k-means: the states), learns the state from the features
(multinomial logistic regression on the principal components of the standardised features), and predicts the
posterior-weighted mean of the states' profiles, the posterior sharpened or flattened by a power. The number of
states, the penalty and the power are chosen by the held-out cell-wise Spearman on whole-sample (or block) tuning
folds, never by squared error.
"""

from __future__ import annotations

import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from regress.components import ComponentInputs
from regress.estimator import ExpressionRegressor, Integral, Interval, Real
from regress.metrics import cellwise_spearman
from regress.splits import scored_rows, tuning_split

TUNING_ROWS = 4000  # held-out rows on which each candidate is scored (ranking 377-460 genes per row costs)
# BLAS and OpenMP threads for k-means and the classifier. Their products are small (64 components, 16-32 states),
# and on a loaded machine a second OpenBLAS thread waits more than it works: fitting states+context on the demo
# took 256 s with two threads beside another job, 8 s with one.
THREADS = 1


def sharpen(posterior: np.ndarray, power: float) -> np.ndarray:
    """posterior ** power, renormalised per row: power > 1 trusts the most likely state more, < 1 less."""
    weights = np.power(np.clip(posterior, 1e-12, None), power)
    return weights / weights.sum(axis=1, keepdims=True)


def expression_states(Y: np.ndarray, n_states: int, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(state of each row, mean profile of each state): k-means on the measured expression. Fewer distinct cells than
    states leave some states empty: only those that hold cells are kept, numbered 0..m-1."""
    from sklearn.cluster import KMeans

    n_states = min(n_states, len(Y))
    kmeans = KMeans(n_clusters=n_states, n_init=2, random_state=random_state).fit(Y)
    present, labels = np.unique(kmeans.labels_, return_inverse=True)
    profiles = np.stack([Y[labels == s].mean(0) for s in range(len(present))]).astype(np.float32)
    return labels, profiles


def state_oracle(train_Y: np.ndarray, test_Y: np.ndarray, n_states: int = 32, random_state: int = 0,
                 block: int = 4096) -> np.ndarray:
    """The ceiling of the state-space family: a perfect classifier. Each test cell is predicted as the profile of the
    state (k-means of the training cells' measured expression, as `ExpressionStates` makes them) nearest to its own
    measured expression. It knows the answer, like `regress.metrics.expression_state_oracle`, but only at the
    resolution of the states: the gap between the two is variation within a state, which no choice of state, however
    well the image shows it, can predict."""
    train_Y = np.asarray(train_Y, dtype=np.float32)
    _, profiles = expression_states(train_Y, n_states, random_state)
    norms = (profiles * profiles).sum(1)
    out = np.empty(np.shape(test_Y), dtype=np.float32)
    for start in range(0, len(out), block):
        query = np.asarray(test_Y[start: start + block], dtype=np.float32)
        out[start: start + block] = profiles[np.argmin(norms[None, :] - 2.0 * query @ profiles.T, axis=1)]
    return out


class ExpressionStates(ExpressionRegressor):
    """Features -> posterior over k-means states of the measured expression -> posterior-weighted state profiles.

    `n_states`, `C` (inverse penalty of the logistic regression) and `power` are grids; the combination with the best
    held-out cell-wise Spearman on a tuning fold (whole samples when `groups` is given) is refitted on every row.
    """

    _parameter_constraints = {
        "n_states": ["array-like"], "C": ["array-like"], "power": ["array-like"],
        "n_feature_components": [Interval(Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(Integral, 1, None, closed="left")], "scale_sets": ["array-like", None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }
    _element_constraints = {"n_states": [Interval(Integral, 1, None, closed="left")],
                            "C": [Interval(Real, 0, None, closed="neither")],
                            "power": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, n_states: tuple[int, ...] = (16, 32), C: tuple[float, ...] = (0.01, 0.1),
                 power: tuple[float, ...] = (0.5, 1.0, 2.0), n_feature_components: int | None = 64,
                 max_iter: int = 300, scale_sets: np.ndarray | None = None, random_state: int = 0):
        self.n_states, self.C, self.power = n_states, C, power
        self.n_feature_components, self.max_iter = n_feature_components, max_iter
        self.scale_sets, self.random_state = scale_sets, random_state

    # -- pieces ----------------------------------------------------------------------------------------------------
    def _classifier(self, Z: np.ndarray, labels: np.ndarray, C: float):
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():  # a capped number of iterations is a choice, not a fault
            warnings.simplefilter("ignore")
            return LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.random_state).fit(Z, labels)

    @staticmethod
    def _expected(classifier, profiles: np.ndarray, Z: np.ndarray, power: float) -> np.ndarray:
        posterior = np.zeros((len(Z), len(profiles)))
        posterior[:, classifier.classes_] = classifier.predict_proba(Z)
        return sharpen(posterior, power) @ profiles

    # -- estimator API ---------------------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        with threadpool_limits(limits=THREADS):
            return self._fit(X, Y, groups)

    def _fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None):
        X, Y = self._fit_data(X, Y)
        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.inputs_ = ComponentInputs.fit(X, self.n_feature_components, self.scale_sets)
        Z = self.inputs_.transform(X)
        self.tuning_ = self._tune(Z, Y, groups)
        best = max(self.tuning_, key=self.tuning_.get)
        self.n_states_, self.C_, self.power_ = best
        labels, self.profiles_ = expression_states(Y, self.n_states_, self.random_state)
        self.classifier_ = self._classifier(Z, labels, self.C_)
        self.n_iter_ = int(np.max(self.classifier_.n_iter_))  # the classifier's iterations (max_iter caps them)
        self._set_clip(Y)
        return self

    def _tune(self, Z: np.ndarray, Y: np.ndarray, groups: np.ndarray | None) -> dict[tuple, float]:
        """Held-out cell-wise Spearman of every (n_states, C, power) on one tuning fold."""
        grid = [(int(k), float(c), float(p)) for k in self.n_states for c in self.C for p in self.power]
        if len(grid) == 1:
            return {grid[0]: float("nan")}
        valid = tuning_split(len(Z), groups, self.random_state)
        scored = scored_rows(np.flatnonzero(valid), TUNING_ROWS, self.random_state)
        scores = {}
        for k in self.n_states:
            labels, profiles = expression_states(Y[~valid], int(k), self.random_state)
            for c in self.C:
                classifier = self._classifier(Z[~valid], labels, float(c))
                for p in self.power:
                    expected = self._expected(classifier, profiles, Z[scored], float(p))
                    scores[int(k), float(c), float(p)] = float(cellwise_spearman(Y[scored], expected).mean())
        return scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._predict_data(X)
        with threadpool_limits(limits=THREADS):
            return self._clip(self._expected(self.classifier_, self.profiles_, self.inputs_.transform(X),
                                             self.power_))
