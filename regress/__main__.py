"""python -m regress --data DIR --cache DIR --model-dir DIR [--models ridge ridge+context lightgbm ...]

Without --encoder, --patch-sizes and --extra-features it reads the default features (slidedata.recipe), chosen by
the samples' pixel sizes as the embed stage chose them: what `python -m embed` wrote without those options.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import pandas as pd

from slidedata.cli import (DefaultsHelpFormatter, StageParser, add_output_flags, add_sample_arguments,
                           elements_from_args, non_negative_int, positive_float, positive_int,
                           run_reporting_input_errors)
from slidedata.patch_size import PatchSize, patch_size_arg
from slidedata.recipe import DEFAULT_FEATURES


def main(argv: list[str] | None = None, prog: str = "python -m regress") -> int:
    from regress.features import CONTEXT_POOLS, FeatureSpec
    from regress.fit import fit_and_evaluate
    from regress.model_dir import ModelDir
    from regress.families import model_names
    from regress.ridge import ALPHA_CRITERIA
    from regress.settings import PROTOCOLS, TUNING_FOLDS, FitSettings, default_features
    from regress.tasks import SchedulerUnreachable

    defaults, feature_defaults = FitSettings(), default_features()
    parser = StageParser(prog=prog, description="Fit and evaluate expression regressors.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="a sample zarr or a folder of <sample>.zarr")
    parser.add_argument("--cache", default="outputs/features.zarr", help="the feature cache the embed stage wrote")
    parser.add_argument("--model-dir", default="outputs/model", help="where the chosen model and its scores go")
    parser.add_argument("--encoder", help="the encoder whose features to read (default: the default features, "
                        "those the embed stage writes without --encoder and --patch-sizes, chosen by the samples' "
                        f"pixel sizes; {feature_defaults.encoder} where --patch-sizes or --extra-features is given)")
    parser.add_argument("--patch-sizes", nargs="+", type=patch_size_arg,
                        help="slide pixels (64) or microns (32um), as embedded (default: the default features'; "
                             f"{' '.join(map(str, feature_defaults.patch_sizes))} where --encoder is given)")
    parser.add_argument("--models", nargs="+", default=list(defaults.models), metavar="MODEL",
                        help=f"models to evaluate, the best one saved: {', '.join(model_names())}")
    parser.add_argument("--context-k", type=non_negative_int,
                        help="neighbours pooled for the +context models and mlp-ensemble (0: none, then give "
                             f"--context-radius) (default: the default features' neighbourhood, within "
                             f"{DEFAULT_FEATURES.pixel_size_known.context_radius_um[0]:g} um where the pixel size is "
                             f"known, else the {feature_defaults.context_k} nearest; the {feature_defaults.context_k} "
                             "nearest where features are named)")
    parser.add_argument("--ridge-criterion", choices=list(ALPHA_CRITERIA), default=defaults.ridge_criterion,
                        help="what ridge's alpha is chosen by: the held-out squared error or cell-wise Spearman")
    parser.add_argument("--context-radius", type=positive_float, nargs="+",
                        help="px: the +context models and mlp-ensemble pool all nuclei within this radius (or each of "
                             "several) instead of the k nearest")
    parser.add_argument("--context-pool", nargs="+", choices=CONTEXT_POOLS, default=list(feature_defaults.context_pool),
                        help="how the neighbours' features are pooled: one block per pool and neighbourhood")
    parser.add_argument("--protocol", default=defaults.protocol, choices=list(PROTOCOLS),
                        help="how models are scored on held-out tissue (auto: the validation group where it has "
                             "expression, else leave one sample out with two or more samples, else spatial blocks)")
    parser.add_argument("--no-morphology", action="store_true", help="leave out nucleus shape from the mask")
    parser.add_argument("--no-figures", action="store_true",
                        help="draw no scores.png or maps.png: about a second less per fit (scores.csv has the "
                             "scores)")
    parser.add_argument("--extra-features", nargs="+", default=[], metavar="ENCODER:PATCH_SIZE",
                        help="more cached blocks to concatenate, e.g. uni:224 virchow2:224")
    parser.add_argument("--pca", type=non_negative_int, default=defaults.ridge_components,
                        help="ridge on this many principal components where it has more features, and feature blocks "
                             "(encoder x patch size) wider than this reduced to as many first (0: never)")
    parser.add_argument("--sample-rows", type=positive_int, default=defaults.sample_rows,
                        help="LightGBM and the spatial baseline train on at most this many rows, drawn from every "
                             "sample, group and spatial block alike (ridge always uses every row)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the per-sample passes on this dask.distributed scheduler (e.g. tcp://host:8786); "
                             "its workers must see the same --data and --cache paths")
    parser.add_argument("--standardize-per-sample", action="store_true",
                        help="z-score every feature within each sample (removes slide-wide stain/scanner shifts)")
    parser.add_argument("--tuning-folds", default=defaults.tuning_folds, choices=list(TUNING_FOLDS),
                        help="what the folds of ridge's alpha CV and LightGBM's early stopping are made of "
                             "(auto: whole samples when three or more train the model, else spatial blocks)")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)

    def extra_key(key: str) -> tuple[str, PatchSize]:
        encoder, _, size = key.rpartition(":")
        try:
            if not encoder:
                raise ValueError("expected ENCODER:PATCH_SIZE")
            return encoder, PatchSize.parse(size)
        except ValueError as exc:
            parser.error(f"argument --extra-features: '{key}': {exc}")

    try:
        settings = FitSettings(
            features=FeatureSpec(encoder=args.encoder or feature_defaults.encoder,
                                 patch_sizes=tuple(args.patch_sizes or feature_defaults.patch_sizes),
                                 extra_keys=tuple(extra_key(k) for k in args.extra_features),
                                 morphology=not args.no_morphology,
                                 context_k=feature_defaults.context_k if args.context_k is None else args.context_k,
                                 context_radius=args.context_radius, context_pool=args.context_pool,
                                 standardize_per_sample=args.standardize_per_sample,
                                 block_components=args.pca or None),
            models=tuple(args.models), protocol=args.protocol, tuning_folds=args.tuning_folds,
            ridge_components=args.pca or None, ridge_criterion=args.ridge_criterion, sample_rows=args.sample_rows,
            scheduler=args.scheduler, figures=not args.no_figures)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()

    named = args.encoder is not None or args.patch_sizes is not None or bool(args.extra_features)

    def stage() -> int:
        chosen = settings
        if not named:  # the default features, as the embed stage chose them for these samples
            recipe, microns_per_pixel = DEFAULT_FEATURES.for_data(args.data, cache=args.cache,
                                                                  elements=elements_from_args(args))
            print(f"default features, the {recipe.describe()}")
            recipe_features = default_features(recipe, microns_per_pixel)
            context = {} if args.context_k is not None or args.context_radius else \
                {"context_k": recipe_features.context_k, "context_radius": recipe_features.context_radius}
            chosen = replace(settings, features=replace(
                settings.features, encoder=recipe_features.encoder, patch_sizes=recipe_features.patch_sizes,
                extra_keys=recipe_features.extra_keys, **context))
        scores, predictor = fit_and_evaluate(args.data, args.cache, args.model_dir, chosen,
                                             elements=elements_from_args(args))
        with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 140):
            print(scores.to_string(index=False))
        print(f"saved: {predictor.model_name}, because {predictor.scores['verdict']}")
        print(f"  -> {args.model_dir}/predictor.joblib ({', '.join(ModelDir(args.model_dir).reports())} beside "
              f"it); fit stage {time.perf_counter() - start:.1f} s")
        return 0

    return run_reporting_input_errors(stage, args, (SchedulerUnreachable,),
                                      interrupted="each file of the model folder is whole (the old or the new "
                                                  "one); the feature cache is as it was")


if __name__ == "__main__":
    sys.exit(main())
