"""python -m embed --data DIR --cache DIR [--encoder NAME] [--weights PATH] [--patch-sizes 32 64 ...]

Without --encoder and --patch-sizes it embeds the default features (slidedata.recipe): the recipe measured on real
H&E where every sample's pixel size is known, else the handcrafted features at pixel sizes.

Under torchrun (or any launcher that sets RANK and WORLD_SIZE) each process embeds its own share of the pending
chunks of every sample into the same cache.
"""

from __future__ import annotations

import os
import sys
import time

import pandas as pd

from embed.pipeline import MAX_CPU_WORKERS, MIN_NUCLEI_PER_WORKER, EmbedSettings
from slidedata.cli import (DefaultsHelpFormatter, StageParser, add_output_flags, add_sample_arguments,
                           elements_from_args, non_negative_int, positive_float, positive_int,
                           run_reporting_input_errors)
from slidedata.patch_size import patch_size_arg
from slidedata.recipe import DEFAULT_FEATURES


def main(argv: list[str] | None = None, prog: str = "python -m embed") -> int:
    from embed.registry import encoder_table

    defaults = EmbedSettings()

    parser = StageParser(prog=prog, description="Embed every nucleus into the cache.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", help="a sample zarr or a folder of <sample>.zarr")
    parser.add_argument("--cache", default="outputs/features.zarr", help="the zarr feature cache")
    parser.add_argument("--encoder", help="registry name (see --list-encoders) (default: with --patch-sizes not "
                        "given either, the default features, chosen by the samples' pixel sizes: known, "
                        f"{DEFAULT_FEATURES.pixel_size_known.describe(context=False)}; unknown, "
                        f"{DEFAULT_FEATURES.pixel_size_unknown.describe(context=False)}; handcrafted where "
                        "--patch-sizes is given)")
    parser.add_argument("--weights", help="local weights file or hub-layout folder (else the hub, HF_TOKEN); needs "
                        "--encoder")
    parser.add_argument("--patch-sizes", nargs="+", type=patch_size_arg,
                        help="context sizes: slide pixels (64) or microns of tissue (32um) (default: the default "
                             f"features'; {' '.join(map(str, defaults.patch_sizes))} where --encoder is given)")
    parser.add_argument("--microns-per-pixel", type=positive_float,
                        help="the slides' pixel size, for samples that do not store it (Xenium H&E: 0.2125); "
                             "one that disagrees with a stored size is refused")
    parser.add_argument("--force-microns-per-pixel", action="store_true",
                        help="use --microns-per-pixel even where a sample stores another pixel size")
    parser.add_argument("--input-size", type=positive_int,
                        help="resample every crop to this edge instead of the encoder's own (faster on a CPU)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="patches per encoder call")
    parser.add_argument("--chunk-nuclei", type=positive_int, default=defaults.chunk_nuclei,
                        help="rows per cache chunk (unit of resumption)")
    parser.add_argument("--workers", type=non_negative_int, default=defaults.num_workers,
                        help="DataLoader workers (default: for an encoder on one CPU thread, the handcrafted one, "
                             f"one per core, at most {MAX_CPU_WORKERS}, each cutting and encoding its own chunks, "
                             f"of at least {MIN_NUCLEI_PER_WORKER} nuclei in all (fewer: none); "
                             "otherwise none: a network on a CPU uses torch's threads, and on a GPU raise it if the "
                             "GPU waits for patches)")
    parser.add_argument("--torch-threads", type=positive_int,
                        help="encoder threads on a CPU (default: 1 for handcrafted, torch's default for networks)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--stain-normalization", choices=["macenko"], default=None,
                        help="normalise the stain of every slide first (default: none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--tta", action="store_true", default=defaults.tta,
                        help="test-time augmentation: average each crop's features over its 8 rotations and flips "
                             "(8x the encoder's work; part of the cache entry's identity)")
    parser.add_argument("--list-encoders", action="store_true",
                        help="the registry: dimensions, licences, where the weights come from (offline or not)")
    parser.add_argument("--list", action="store_true", help="list the cache's entries")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)

    if args.list_encoders:
        print(pd.DataFrame(encoder_table()).to_string(index=False))
        print("offline: runs without a network as installed; every loadable encoder also does with --weights PATH "
              "(a local file or hub-layout folder)")
        return 0
    if args.list:
        from slidedata.feature_store import FeatureStore

        def listing() -> int:  # only reads: a cache that is not there is said so, never created
            print(FeatureStore(args.cache, create=False).entries().to_string(index=False))
            return 0

        return run_reporting_input_errors(listing, args)
    if not args.data:
        parser.error("--data is required")

    from embed.pipeline import embed_dataset, embed_recipe
    from embed.encoders import EncoderLoadError

    from embed.registry import get_spec

    default = args.encoder is None and args.patch_sizes is None  # the default features, chosen by the pixel sizes
    if default and args.weights:
        parser.error("--weights needs --encoder: the default features' encoders bring their own weights")
    try:
        get_spec(args.encoder or "handcrafted")
    except KeyError as exc:  # only the name lookup: a KeyError from deeper down is a bug and keeps its traceback
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        parser.error(f"RANK and WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} and "
                     f"{os.environ.get('WORLD_SIZE')!r}")
    try:  # the settings check themselves (the API's callers get the same checks): their ValueError is a usage error
        settings = EmbedSettings(patch_sizes=tuple(args.patch_sizes or defaults.patch_sizes),
                                 batch_size=args.batch_size,
                                 input_size=args.input_size,
                                 chunk_nuclei=args.chunk_nuclei, num_workers=args.workers,
                                 torch_threads=args.torch_threads,
                                 stain_normalization=args.stain_normalization, compile=args.compile, tta=args.tta,
                                 rank=rank, world_size=world)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()

    def stage() -> int:
        options = dict(device=device, microns_per_pixel=args.microns_per_pixel,
                       force_microns_per_pixel=args.force_microns_per_pixel, elements=elements_from_args(args))
        if default:
            recipe, _ = DEFAULT_FEATURES.for_data(args.data, microns_per_pixel=args.microns_per_pixel,
                                                  force_microns_per_pixel=args.force_microns_per_pixel,
                                                  elements=options["elements"])
            print(f"default features, the {recipe.describe(context=False)}")
            reports = embed_recipe(args.data, args.cache, recipe, settings, **options)
        else:
            reports = embed_dataset(args.data, args.cache, args.encoder or "handcrafted", args.weights, settings,
                                    **options)
        for r in reports:
            print(f"{r.sample} [{r.encoder}]: {r.nuclei} nuclei, computed {r.units_computed} of {r.units_total} "
                  f"chunks in {r.seconds:.1f} s")
        print(f"embed: {time.perf_counter() - start:.1f} s, cache {args.cache}")
        return 0

    return run_reporting_input_errors(stage, args, (EncoderLoadError,),
                                      interrupted="every finished unit is kept in the cache: run the same command "
                                                  "again to resume")


if __name__ == "__main__":
    sys.exit(main())
