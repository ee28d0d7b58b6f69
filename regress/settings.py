"""The fit stage's settings: one dataclass, checked once where it is made (the CLI and the API alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

from regress.families import REGISTRY, ModelSpec, parameters, renamed
from regress.features import DEFAULT_CONTEXT_K, FeatureSpec, covering
from regress.ridge import DEFAULT_ALPHAS
from slidedata.recipe import PIXEL_RECIPE, Recipe

PROTOCOLS = ("auto", "validation", "spatial-kfold", "loso")
TUNING_FOLDS = ("auto", "samples", "blocks")


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
    without it (each family's `features` hook, `regress.families`).
    """

    features: FeatureSpec = field(default_factory=default_features)
    # states+context beat ridge+context leaving one out on both real benchmarks (README: bench-real, bench-cell)
    models: tuple[str, ...] = ("mean-profile", "spatial-knn", "ridge", "ridge+context", "states+context")
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
    # Each family's parameters beyond its defaults, by family name: {'lightgbm': {'n_estimators': 200},
    # 'mlp-ensemble': {'device': 'cuda'}} (the estimators' own parameters, regress.families)
    params: dict = field(default_factory=dict)
    # LightGBM and the spatial baseline train on at most this many rows, drawn in proportion from every sample, role
    # (train / validation) and spatial block; ridge and the mean profile always see every row (their statistics).
    sample_rows: int = 100_000
    # None: compute in this process, one sample at a time; or the address of a dask.distributed scheduler
    # (tcp://host:8786) whose workers read the same cache and data paths.
    scheduler: str | None = None
    # scores.png and maps.png (matplotlib: about a second per fit on 2 cores, whatever the data's size). Off for a
    # sweep of many fits, or a runner that reads none: the scores are in scores.csv either way.
    figures: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no model given; choose from the registered ones (regress.families)")
        specs = [ModelSpec.parse(m) for m in self.models]
        self.models = tuple(s.name for s in specs)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{self.protocol}'; choose from {', '.join(PROTOCOLS)}")
        if self.tuning_folds not in TUNING_FOLDS:
            raise ValueError(f"unknown tuning_folds '{self.tuning_folds}'; choose from {', '.join(TUNING_FOLDS)}")
        for name in ("n_folds", "n_blocks", "sample_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        self.params = {name: dict(values) for name, values in self.params.items()}
        for name in self.params:
            if name not in REGISTRY:
                new = renamed(name)
                raise ValueError(f"params: family '{name}' is now called '{new}'" if new else
                                 f"params: unknown family '{name}'; choose from {', '.join(REGISTRY)}")
        # Every family's parameters (the settings' own options for ridge among them) are checked here, not after the
        # first pass over the data.
        for family in REGISTRY.values():
            if family.name in self.params or family.settings_parameters:
                family.check(parameters(family, self))
        if any(s.context for s in specs) and not self.features.has_context:
            raise ValueError("a +context or mlp-ensemble model needs a neighbourhood: context_k > 0 (--context-k; "
                             f"FeatureSpec(context_k={DEFAULT_CONTEXT_K}) as default_features() has) or a "
                             "context_radius (--context-radius)")

    def model_features(self, name: str) -> FeatureSpec:
        """The features model `name` reads (its family's `features` hook)."""
        return ModelSpec.parse(name).features(self.features)

    @property
    def gathered_features(self) -> FeatureSpec:
        """What the fit reads from the cache: the features that hold every model's (`regress.features.covering`)."""
        return covering([self.model_features(m) for m in self.models])
