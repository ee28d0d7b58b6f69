"""Principal components, the one PCA helper of the package, and the inputs the row-trained families read.

`principal_axes` is the only place an eigendecomposition or SVD of data is made: the feature reducer's axes of wide
blocks (`principal_basis`), ridge's components (from its statistics), the row-trained families' inputs
(`ComponentInputs`), LightGBM's target components and the expression-state oracle all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_SVD_LIMIT = 2048  # below this many rows or columns, an exact SVD is cheap


def principal_axes(rows: np.ndarray | None, n_components: int, gram: np.ndarray | None = None,
                   exact: bool | None = None, random_state: int = 0) -> np.ndarray:
    """The top `n_components` principal axes (d x k, largest first) of centred `rows`, or of a d x d `gram`
    matrix (X'X, from statistics: no rows needed).

    From rows: an exact SVD where it is cheap (or `exact`), else a randomised SVD (the axes of a subsample are as
    good for a regression target and cost one pass). From a Gram matrix: its eigenvectors.
    """
    if gram is not None:
        return np.linalg.eigh(gram)[1][:, ::-1][:, :n_components]
    if exact or (exact is None and min(rows.shape) <= EXACT_SVD_LIMIT):
        return np.linalg.svd(rows, full_matrices=False)[2][:n_components].T
    from sklearn.utils.extmath import randomized_svd

    return randomized_svd(rows, n_components, n_iter=7, random_state=random_state)[2].T


def principal_basis(X: np.ndarray, n_components: int, random_state: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, scale, basis d x k): the top principal axes of the standardised rows of X (a bounded subsample)."""
    sample = np.asarray(X, dtype=np.float64)
    centre, scale = sample.mean(0), sample.std(0)
    scale[scale < 1e-12] = 1.0
    return centre, scale, principal_axes((sample - centre) / scale, n_components, random_state=random_state)


def project(X: np.ndarray, centre: np.ndarray, scale: np.ndarray, basis: np.ndarray, block: int = 65536
            ) -> np.ndarray:
    """((X - centre) / scale) @ basis, a block of rows at a time, as float32."""
    out = np.empty((X.shape[0], basis.shape[1]), dtype=np.float32)
    for start in range(0, X.shape[0], block):
        rows = np.asarray(X[start: start + block], dtype=np.float64)
        out[start: start + block] = ((rows - centre) / scale) @ basis
    return out


def top_components(M: np.ndarray, k: int | None) -> np.ndarray | None:
    """Top-k principal axes (float32 columns) of a centred matrix, from its d x d Gram matrix; None for k None."""
    if k is None or k >= M.shape[1]:
        return None if k is None else np.eye(M.shape[1], dtype=np.float32)
    return principal_axes(None, k, gram=(M.T @ M).astype(np.float64)).astype(np.float32)


def column_scale(variances: np.ndarray, sets: np.ndarray | None = None) -> np.ndarray:
    """Standard deviation per column, or, for columns in one group, the root mean variance of the group.

    A block reduced to principal components (`regress.features.FeatureReducer`) is one group: scaling its components
    one by one would blow its smallest directions up to the weight of its largest; a common scale keeps the geometry
    the block's standardised features had.
    """
    variances = np.clip(np.asarray(variances, dtype=np.float64), 1e-12, None)
    if sets is None:
        return np.sqrt(variances)
    sets = np.asarray(sets)
    mean = np.bincount(sets, weights=variances) / np.bincount(sets)
    return np.sqrt(mean[sets])


@dataclass
class ComponentInputs:
    """What a row-trained family reads: the standardised features (a reduced block scaled as one, `column_scale`)
    projected onto their top principal axes, all divided by one common scale (`rescale`) so that a penalty or a
    learning rate means the same on any data; trees need no common scale (LightGBM: `rescale=False`, scale 1)."""

    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray | None
    common_scale: float

    @classmethod
    def fit(cls, X: np.ndarray, n_components: int | None, scale_sets: np.ndarray | None = None,
            rescale: bool = True) -> "ComponentInputs":
        X = np.asarray(X, dtype=np.float32)
        mean = X.mean(0)
        scale = (column_scale(X.var(0), scale_sets) + 1e-6).astype(np.float32)
        standardised = (X - mean) / scale
        axes = top_components(standardised, n_components)
        if not rescale:
            return cls(mean, scale, axes, 1.0)
        projected = standardised @ axes if axes is not None else standardised
        return cls(mean, scale, axes, float(projected.std() + 1e-6))

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float32) - self.mean) / self.scale
        return ((Z @ self.axes if self.axes is not None else Z) / np.float32(self.common_scale)).astype(np.float32)
