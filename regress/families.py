"""The model families: one record each, the one place that knows their names and what sets them apart.

A model name is `family` or `family+context` (the family on the features plus their neighbourhood blocks); it is
parsed once, into a `ModelSpec`, and everything else (the engine, selection, the settings, the CLI, plots) asks the
spec, never the name. A family is one module (its estimator: `fit(X, Y, groups)`, `predict`, the scikit-learn API
through `regress.estimator.ExpressionRegressor`) and one `register(Family(...))` entry below; see ARCHITECTURE.md.

What a record says:

* `estimator`: the class; `make(params, layout)` builds it (default: `estimator(**params)`, plus
  `scale_sets=layout.scale_sets` where it takes them). Parameters are the estimator's own, typed and constrained in
  its `_parameter_constraints` (`regress.estimator.check_parameters`), refused before any data is read (`check`).
* `complexity`: its rank for the one-standard-error rule (simplest first); `+context` ranks just above the same
  family without it.
* `trains_from`: 'rows' (the engine's bounded row subsample: `fit(X, Y, groups)`) or 'statistics' (every row,
  streamed: `fit_statistics(stats, groups, scoring_rows)`, see `StatisticsTrained`).
* `reads`: 'features', 'positions' ((y, x, sample code)) or 'nothing' (the mean profile).
* `context`: 'optional' (`family` and `family+context`), 'always' or 'never'.
* `features(spec, context) -> FeatureSpec`: the features the model reads, given the settings' spec (default: the
  spec with its context blocks when the model reads context, without them otherwise; never a neighbour set). The matrix the engine
  gathers covers every model's spec (`regress.features.covering`) and each model takes its columns
  (`regress.features.feature_columns`); the saved model stores its own spec, so prediction builds exactly them.
* `serves_unseen_tissue`: False keeps it out of selection (it cannot predict a slide it never saw).
* `expected_failed_checks`: the scikit-learn `check_estimator` checks that cannot apply, each with its reason.
* `renamed_from`: former names; a model directory saved under one loads (`regress.model_format`), a setting that
  names one is refused with the new name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from regress.baselines import MeanProfile, SpatialKNNProfile
from regress.boosting import LightGBMRegressor
from regress.estimator import FAILS_EVERYWHERE, check_parameters
from regress.features import FeatureSpec, feature_columns
from regress.mlp_ensemble import MLPEnsembleRegressor
from regress.neighbour_set import NeighbourSetRegressor, make_neighbour_set, neighbour_features
from regress.ridge import MomentStats, RidgeCVRegressor, settings_parameters
from regress.states import ExpressionStates

CONTEXT = "+context"
TRAINS_FROM = ("rows", "statistics")
READS = ("features", "positions", "nothing")
CONTEXT_MODES = ("optional", "always", "never")


class StatisticsTrained(Protocol):
    """The streamed-statistics contract of a family with `trains_from='statistics'`: `stats`, the statistics of
    each training stratum (of the columns the model reads); `groups`, each stratum's tuning label (its sample or
    spatial block); `scoring_rows(positions into stats)`, some rows (X, Y) of those strata, for a family whose own
    tuning scores rows. The family does its own tuning (folds, a grid) from these."""

    def fit_statistics(self, stats: list[MomentStats], groups: np.ndarray,
                       scoring_rows: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]) -> Any: ...


@dataclass(frozen=True)
class InputLayout:
    """What the columns a model reads are: handed to its constructor, and used to take its inputs.

    `features`: the FeatureSpec it reads (None: arrays not built from a spec); `base_dim`: the width of the base
    features (no context block); `width`: how many columns it reads; `columns`: where they are in the matrix the
    engine gathered (a slice or indices; None: every column); `scale_sets`: per column read, its standardisation
    set (`regress.components.column_scale`).
    """

    reads: str
    features: FeatureSpec | None
    base_dim: int
    width: int
    columns: slice | np.ndarray | None = None
    scale_sets: np.ndarray | None = None

    def take(self, X: np.ndarray, coords: np.ndarray, codes) -> np.ndarray:
        """The model's inputs from rows of the gathered matrix (and their positions and sample codes)."""
        if self.reads == "positions":  # (y, x), samples far apart on the x axis: neighbours never cross samples
            coords = np.asarray(coords, dtype=np.float64)
            return np.c_[coords[:, 0], coords[:, 1] + np.broadcast_to(codes, len(coords)) * 1e9]
        return X if self.columns is None else X[:, self.columns]


def _with_or_without_context(spec: FeatureSpec, context: bool) -> FeatureSpec:
    # the neighbour set is a block for a family that asks for it in its own hook, never read by default
    return spec.without_neighbour_set() if context else spec.without_context()


@dataclass(frozen=True)
class Family:
    name: str
    estimator: type
    complexity: int
    trains_from: str = "rows"
    reads: str = "features"
    context: str = "optional"
    serves_unseen_tissue: bool = True
    baseline: bool = False
    make: Callable[[dict, InputLayout], Any] | None = None
    features: Callable[[FeatureSpec, bool], FeatureSpec] = _with_or_without_context
    # the settings' own options that are this family's parameters (ridge's --pca, --ridge-criterion)
    settings_parameters: Callable[[Any], dict] | None = None
    expected_failed_checks: Mapping[str, str] = field(default_factory=lambda: dict(FAILS_EVERYWHERE))
    renamed_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trains_from not in TRAINS_FROM or self.reads not in READS or self.context not in CONTEXT_MODES:
            raise ValueError(f"family {self.name}: trains_from, reads or context out of {TRAINS_FROM}, {READS}, "
                             f"{CONTEXT_MODES}")

    @property
    def parameters(self) -> list[str]:
        """The parameters a user may set (the estimator's, less what the layout gives)."""
        return [p for p in self.estimator._get_param_names() if p != "scale_sets"]

    def build(self, params: Mapping, layout: InputLayout):
        """A fresh estimator with `params`, for inputs laid out as `layout`."""
        if self.make is not None:
            return self.make(dict(params), layout)
        takes_sets = "scale_sets" in self.estimator._get_param_names()
        return self.estimator(**({"scale_sets": layout.scale_sets} if takes_sets else {}), **params)

    def check(self, params: Mapping) -> None:
        """Refuse unknown or invalid parameters (ValueError naming them), before any data is read."""
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(sorted(self.parameters))}")
        estimator = self.build(params, InputLayout(self.reads, None, 1, 1))
        try:
            check_parameters(estimator)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in REGISTRY or CONTEXT in family.name:
        raise ValueError(f"family name {family.name!r} is taken or holds {CONTEXT!r}")
    REGISTRY[family.name] = family
    return family


def renamed(name: str) -> str | None:
    """The current name of a family's former name (None if it is not one)."""
    return next((f.name for f in REGISTRY.values() if name in f.renamed_from), None)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: its family and whether it reads the context blocks."""

    family: Family
    context: bool

    @classmethod
    def parse(cls, name: str) -> "ModelSpec":
        base, plus, suffix = name.partition("+")
        family = REGISTRY.get(base)
        if family is None or (plus and f"+{suffix}" != CONTEXT):
            new = renamed(base)
            if new:  # its former name, with or without the context suffix: the name to write now
                now = new + (CONTEXT if plus and REGISTRY[new].context == "optional" else "")
                raise ValueError(f"model '{name}' is now called '{now}'")
            raise ValueError(f"unknown model '{name}'; choose from {', '.join(model_names())}")
        if plus and family.context != "optional":
            raise ValueError(f"model '{name}': {family.name} {'always' if family.context == 'always' else 'never'} "
                             f"reads the neighbourhood; write '{family.name}'")
        return cls(family, bool(plus) or family.context == "always")

    @property
    def name(self) -> str:
        return self.family.name + (CONTEXT if self.context and self.family.context == "optional" else "")

    @property
    def rank(self) -> tuple[int, bool]:
        """Simplest first: the family's complexity, then without context before with it."""
        return self.family.complexity, self.context

    def features(self, spec: FeatureSpec) -> FeatureSpec:
        """The features this model reads, given the settings' spec."""
        return self.family.features(spec, self.context)

    def layout(self, gathered: FeatureSpec, settings_spec: FeatureSpec, base_dim: int,
               scale_sets: np.ndarray | None = None) -> InputLayout:
        """Where this model's inputs are in a matrix built for `gathered` (base features `base_dim` wide)."""
        if self.family.reads == "positions":
            return InputLayout("positions", None, base_dim, 2)
        read = self.features(settings_spec)
        columns = feature_columns(read, gathered, base_dim)
        width = len(np.arange(sum(w for _, w in gathered.blocks(base_dim)))[columns])
        sets = None if scale_sets is None else np.asarray(scale_sets)[columns]
        return InputLayout(self.family.reads, read, base_dim, width, columns, sets)

    def make(self, settings, layout: InputLayout):
        """A fresh estimator of this model under the fit stage's `settings`."""
        return self.family.build(parameters(self.family, settings), layout)


def parameters(family: Family, settings) -> dict:
    """The family's parameters under the fit stage's settings: its own options there, then `settings.params`."""
    own = family.settings_parameters(settings) if family.settings_parameters else {}
    return {**own, **settings.params.get(family.name, {})}


def model_names() -> list[str]:
    """Every valid model name, in the registry's order."""
    return [n for f in REGISTRY.values()
            for n in ((f.name, f.name + CONTEXT) if f.context == "optional" else (f.name,))]


def is_baseline(name: str) -> bool:
    """Whether `name` is a baseline model (False for any name that is not a model, e.g. a benchmark's oracle)."""
    try:
        return ModelSpec.parse(name).family.baseline
    except ValueError:
        return False


# -- the families ---------------------------------------------------------------------------------------------------
register(Family(
    "mean-profile", MeanProfile, complexity=0, trains_from="statistics", reads="nothing", context="never",
    baseline=True))
register(Family(
    "spatial-knn", SpatialKNNProfile, complexity=0, reads="positions", context="never", serves_unseen_tissue=False,
    baseline=True))
register(Family("ridge", RidgeCVRegressor, complexity=1, trains_from="statistics",
                settings_parameters=settings_parameters))
register(Family("states", ExpressionStates, complexity=2))
register(Family("lightgbm", LightGBMRegressor, complexity=3))
register(Family("mlp-ensemble", MLPEnsembleRegressor, complexity=4, context="always", renamed_from=("deepsets",)))
register(Family("neighbour-set", NeighbourSetRegressor, complexity=5, context="always", features=neighbour_features,
                make=make_neighbour_set))

__all__ = ["Family", "InputLayout", "ModelSpec", "REGISTRY", "StatisticsTrained", "is_baseline", "model_names",
           "parameters", "register"]
