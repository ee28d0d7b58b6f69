"""The model families by name: a fresh estimator for each name, what each reads, which is simpler.

`ridge+context` is ridge on the features plus their neighbourhood blocks; `spatial-knn` reads positions only;
`states` predicts in expression-state space (`regress.states`); `deepsets` is the neighbourhood-set MLP ensemble
(`regress.deepsets`), which always reads the neighbourhood.
"""

from __future__ import annotations

import numpy as np

from regress.deepsets import DeepSetsRegressor
from regress.models import LightGBMRegressor, MeanProfile, RidgeCVRegressor, SpatialKNNProfile
from regress.settings import BASELINES, MODELS, FitSettings, reads_context
from regress.states import ExpressionStates

# Simplest first: where models tie within noise, the simpler one is saved (regress.selection).
COMPLEXITY_ORDER = ("mean-profile", "ridge", "ridge+context", "states", "states+context", "lightgbm",
                    "lightgbm+context", "deepsets")
# Trained on their statistics (every row, streamed) rather than on a bounded subsample of rows.
FROM_STATISTICS = ("mean-profile", "ridge")


def family(name: str) -> str:
    return name.split("+")[0]


def make_estimator(name: str, settings: FitSettings, scale_sets: np.ndarray | None = None):
    """A fresh estimator for `name`; `scale_sets` (per input column, see `features.scale_sets`) for the models that
    standardise their inputs."""
    base = family(name)
    if base == "mean-profile":
        return MeanProfile()
    if base == "spatial-knn":
        return SpatialKNNProfile(k=20)
    if base == "ridge":
        return RidgeCVRegressor(alphas=settings.ridge_alphas, n_folds=settings.n_folds,
                                n_components=settings.ridge_components, scale_sets=scale_sets,
                                criterion=settings.ridge_criterion)
    if base == "lightgbm":
        return LightGBMRegressor(**{"scale_sets": scale_sets, **settings.lightgbm})
    if base == "states":
        return ExpressionStates(**{"scale_sets": scale_sets, **settings.states})
    if base == "deepsets":
        return DeepSetsRegressor(**{"scale_sets": scale_sets, **settings.deepsets})
    raise KeyError(f"unknown model '{name}'; choose from {', '.join(BASELINES + MODELS)}")


def model_inputs(name: str, X: np.ndarray, coords: np.ndarray, code, base_dim: int) -> np.ndarray:
    """What model `name` reads: positions (and the sample's code) for the spatial baseline, the features with their
    context block for +context models, without it otherwise."""
    if name == "spatial-knn":
        return np.c_[coords, np.broadcast_to(code, len(coords))]
    return X if reads_context(name) else X[:, :base_dim]


def statistics_width(models: tuple[str, ...], base_dim: int) -> int | None:
    """How many leading feature columns the gathered statistics must cover (None: all): the d x d statistics grow
    with the square of the width, and a run without a statistics-trained model reading the context need not pay
    for its blocks."""
    readers = [m for m in models if family(m) in FROM_STATISTICS and family(m) != "mean-profile"]
    if any(input_width(m, base_dim) is None for m in readers):
        return None
    return base_dim if readers else 0


def input_width(name: str, base_dim: int) -> int | None:
    """How many leading feature columns model `name` reads (None: all of them)."""
    return None if reads_context(name) else base_dim
