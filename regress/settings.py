"""The fit stage's settings: one dataclass, checked once where it is made (the CLI and the API alike)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from regress.deepsets import DeepSetsRegressor
from regress.features import DEFAULT_CONTEXT_K, FeatureSpec
from regress.models import ALPHA_CRITERIA, DEFAULT_ALPHAS, LightGBMRegressor
from regress.states import ExpressionStates
from slidedata.recipe import PIXEL_RECIPE, Recipe

BASELINES = ("mean-profile", "spatial-knn")
MODELS = ("ridge", "ridge+context", "lightgbm", "lightgbm+context", "states", "states+context", "deepsets")
# The neighbourhood-set head reads the neighbourhood by definition: its pooled neighbours are its input.
ALWAYS_WITH_CONTEXT = ("deepsets",)
PROTOCOLS = ("auto", "validation", "spatial-kfold", "loso")
TUNING_FOLDS = ("auto", "samples", "blocks")


def reads_context(name: str) -> bool:
    """Whether model `name` reads the features' neighbourhood (context) blocks."""
    return name.endswith("+context") or name in ALWAYS_WITH_CONTEXT


def default_features(recipe: Recipe = PIXEL_RECIPE, microns_per_pixel: float | None = None) -> FeatureSpec:
    """What `make fit` reads where no features are named: the blocks of `recipe` (slidedata.recipe, which the embed
    stage's defaults come from too; by default the one that needs no pixel size), nucleus shape, and its neighbourhood
    for the +context models (radii in microns converted at `microns_per_pixel`)."""
    main, *extra = recipe.blocks
    return FeatureSpec(encoder=main.encoder, patch_sizes=main.patch_sizes,
                       extra_keys=tuple((block.encoder, size) for block in extra for size in block.patch_sizes),
                       context_k=recipe.context_k, context_radius=recipe.context_radius_px(microns_per_pixel))


@dataclass
class FitSettings:
    """How the fit stage evaluates and chooses its model.

    `features` says what the +context models read (its context block); the other models read the same features
    without it.
    """

    features: FeatureSpec = field(default_factory=default_features)
    # states+context beat ridge+context leaving one out on both real benchmarks (README: bench-real, bench-cell)
    models: tuple[str, ...] = BASELINES + ("ridge", "ridge+context", "states+context")
    protocol: str = "auto"  # one of PROTOCOLS
    n_folds: int = 5
    n_blocks: int = 4  # spatial blocks per side and sample (spatial-kfold and the models' own tuning folds)
    # Ridge on this many principal components where it has more features (None: all features), as HEST-Benchmark does
    # with 256; the axes come from ridge's own statistics, so this streams. On four real sections it beat ridge on
    # all features (see the README's real-tissue benchmark).
    ridge_components: int | None = 256
    ridge_alphas: tuple[float, ...] = DEFAULT_ALPHAS  # penalties tried by ridge's own cross-validation
    # What ridge's alpha is chosen by: 'mse' (the held-out squared error, from the statistics alone) or 'spearman'
    # (the held-out cell-wise Spearman, the challenge's metric, on each tuning fold's rows of the row subsample)
    ridge_criterion: str = "mse"
    # Folds of the models' own tuning (ridge's alpha, LightGBM's early stopping): 'samples' tunes for unseen slides,
    # 'blocks' for unseen places of seen slides; 'auto' is 'samples' when three or more samples train the model.
    tuning_folds: str = "auto"
    lightgbm: dict = field(default_factory=dict)  # LightGBMRegressor's parameters beyond the defaults
    states: dict = field(default_factory=dict)  # ExpressionStates' (regress.states)
    deepsets: dict = field(default_factory=dict)  # DeepSetsRegressor's (regress.deepsets), e.g. {'device': 'cuda'}
    # LightGBM and the spatial baseline train on at most this many rows, drawn in proportion from every sample, role
    # (train / validation) and spatial block; ridge and the mean profile always see every row (their statistics).
    sample_rows: int = 100_000
    # None: compute in this process, one sample at a time; or the address of a dask.distributed scheduler
    # (tcp://host:8786) whose workers read the same cache and data paths.
    scheduler: str | None = None

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        unknown = [m for m in self.models if m not in BASELINES + MODELS]
        if unknown or not self.models:
            raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(BASELINES + MODELS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{self.protocol}'; choose from {', '.join(PROTOCOLS)}")
        for name, estimator in (("lightgbm", LightGBMRegressor), ("states", ExpressionStates),
                                ("deepsets", DeepSetsRegressor)):
            known = set(inspect.signature(estimator.__init__).parameters) - {"self", "scale_sets"}
            unknown = sorted(set(getattr(self, name)) - known)
            if unknown:  # caught here, not after the first pass over the data
                raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(sorted(known))}")
        if self.ridge_criterion not in ALPHA_CRITERIA:
            raise ValueError(f"unknown ridge_criterion '{self.ridge_criterion}'; choose from {', '.join(ALPHA_CRITERIA)}")
        if self.tuning_folds not in TUNING_FOLDS:
            raise ValueError(f"unknown tuning_folds '{self.tuning_folds}'; choose from {', '.join(TUNING_FOLDS)}")
        for name in ("n_folds", "n_blocks", "sample_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.ridge_components is not None and self.ridge_components < 1:
            raise ValueError(f"ridge_components must be positive or None, got {self.ridge_components}")
        if any(reads_context(m) for m in self.models) and not self.features.has_context:
            raise ValueError("a +context or deepsets model needs a neighbourhood: context_k > 0 (--context-k; "
                             f"FeatureSpec(context_k={DEFAULT_CONTEXT_K}) as default_features() has) or a "
                             "context_radius (--context-radius)")

    def model_features(self, name: str) -> FeatureSpec:
        """The features model `name` reads: with the context block for +context models, without it otherwise."""
        return self.features if reads_context(name) else self.features.without_context()

    @property
    def gathered_features(self) -> FeatureSpec:
        """What the fit reads from the cache: the context block too when any model uses it."""
        if any(reads_context(m) for m in self.models):
            return self.features
        return self.features.without_context()
