"""python -m regress --data DIR --cache DIR --model-dir DIR [--models ridge ridge+context lightgbm ...]"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from slidedata.patch_size import DEFAULT_PATCH_SIZES, patch_size_arg


def main(argv: list[str] | None = None) -> int:
    from regress.fit import BASELINES, MODELS, FitSettings, fit_and_evaluate
    from regress.features import FeatureSpec

    parser = argparse.ArgumentParser(prog="python -m regress", description="Fit and evaluate expression regressors.")
    parser.add_argument("--data", required=True, help="a sample zarr or a folder of <sample>.zarr")
    parser.add_argument("--cache", default="outputs/features.zarr")
    parser.add_argument("--model-dir", default="outputs/model")
    parser.add_argument("--encoder", default="handcrafted")
    parser.add_argument("--patch-sizes", nargs="+", type=patch_size_arg, default=list(DEFAULT_PATCH_SIZES),
                        help="slide pixels (64) or microns (32um), as embedded")
    parser.add_argument("--models", nargs="+", default=list(BASELINES) + ["ridge", "ridge+context"],
                        choices=list(BASELINES) + list(MODELS))
    parser.add_argument("--context-k", type=int, default=15, help="neighbours averaged by the +context models")
    parser.add_argument("--context-radius", type=float,
                        help="px: +context models average all nuclei within this radius instead of the k nearest")
    parser.add_argument("--protocol", default="auto", choices=["auto", "validation", "spatial-kfold", "loso"])
    parser.add_argument("--no-morphology", action="store_true", help="leave out nucleus shape from the mask")
    parser.add_argument("--extra-features", nargs="+", default=[], metavar="ENCODER:PATCH_SIZE",
                        help="more cached blocks to concatenate, e.g. uni:224 virchow2:224")
    parser.add_argument("--pca", type=int, default=FitSettings.ridge_components,
                        help="ridge on this many principal components where it has more features, and feature blocks "
                             "(encoder x patch size) wider than this reduced to as many first (0: never)")
    parser.add_argument("--sample-rows", type=int, default=FitSettings.sample_rows,
                        help="LightGBM and the spatial baseline train on at most this many rows, drawn from every "
                             "sample, group and spatial block alike (ridge always uses every row)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the per-sample passes on this dask.distributed scheduler (e.g. tcp://host:8786); "
                             "its workers must see the same --data and --cache paths")
    parser.add_argument("--standardize-per-sample", action="store_true",
                        help="z-score every feature within each sample (removes slide-wide stain/scanner shifts)")
    parser.add_argument("--tuning-groups", default="auto", choices=["auto", "samples", "blocks"],
                        help="folds of ridge's alpha CV and LightGBM's early stopping (auto: samples when >= 3)")
    from slidedata.cli import add_debug_flag, run_reporting_input_errors

    add_debug_flag(parser)
    args = parser.parse_args(argv)

    extra = tuple((key.rsplit(":", 1)[0], key.rsplit(":", 1)[1]) for key in args.extra_features)
    settings = FitSettings(features=FeatureSpec(encoder=args.encoder, patch_sizes=tuple(args.patch_sizes),
                                                extra_keys=extra, morphology=not args.no_morphology,
                                                standardize_per_sample=args.standardize_per_sample,
                                                block_components=args.pca or None),
                           models=tuple(args.models), context_k=args.context_k, protocol=args.protocol,
                           context_radius=args.context_radius, tuning_groups=args.tuning_groups,
                           ridge_components=args.pca or None,
                           sample_rows=args.sample_rows, scheduler=args.scheduler)
    start = time.perf_counter()

    def stage() -> int:
        scores, predictor = fit_and_evaluate(args.data, args.cache, args.model_dir, settings)
        with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 140):
            print(scores.to_string(index=False))
        print(f"best: {predictor.model_name} -> {args.model_dir}/predictor.joblib "
              f"(scores.csv, scores.png beside it); fit stage {time.perf_counter() - start:.1f} s")
        return 0

    return run_reporting_input_errors(stage, args.debug)


if __name__ == "__main__":
    sys.exit(main())
