"""python -m embed --data DIR --cache DIR [--encoder NAME] [--weights PATH] [--patch-sizes 32 64 ...]

Under torchrun (or any launcher that sets RANK and WORLD_SIZE) each process embeds its own share of the pending
chunks of every sample into the same cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd

from embed.pipeline import MAX_CPU_WORKERS, EmbedSettings
from slidedata.cli import add_debug_flag, non_negative_int, positive_float, positive_int, run_reporting_input_errors
from slidedata.patch_size import patch_size_arg


def main(argv: list[str] | None = None) -> int:
    from embed.registry import encoder_table

    defaults = EmbedSettings()

    parser = argparse.ArgumentParser(prog="python -m embed", description="Embed every nucleus into the cache.")
    parser.add_argument("--data", help="a sample zarr or a folder of <sample>.zarr")
    parser.add_argument("--cache", default="outputs/features.zarr", help="the zarr feature cache")
    parser.add_argument("--encoder", default="handcrafted", help="registry name (see --list-encoders)")
    parser.add_argument("--weights", help="local weights file or hub-layout folder (else the hub, HF_TOKEN)")
    parser.add_argument("--patch-sizes", nargs="+", type=patch_size_arg, default=list(defaults.patch_sizes),
                        help="context sizes: slide pixels (64) or microns of tissue (32um)")
    parser.add_argument("--microns-per-pixel", type=positive_float,
                        help="the slides' pixel size, for samples that do not store it (Xenium H&E: 0.2125); "
                             "one that disagrees with a stored size is refused")
    parser.add_argument("--force-microns-per-pixel", action="store_true",
                        help="use --microns-per-pixel even where a sample stores another pixel size")
    parser.add_argument("--input-size", type=positive_int,
                        help="resample every crop to this edge instead of the encoder's own (faster on a CPU)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--chunk-nuclei", type=positive_int, default=defaults.chunk_nuclei,
                        help="rows per cache chunk (unit of resumption)")
    parser.add_argument("--workers", type=non_negative_int, default=defaults.num_workers,
                        help="DataLoader workers (default: on a CPU one per core, at most "
                             f"{MAX_CPU_WORKERS}, each cutting and encoding "
                             "its own chunks; on a GPU none: they only cut, raise it if the GPU waits)")
    parser.add_argument("--torch-threads", type=positive_int,
                        help="encoder threads on a CPU (default: 1 for handcrafted, torch's default for networks)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--stain-normalization", choices=["macenko"], default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--list-encoders", action="store_true")
    parser.add_argument("--list", action="store_true", help="list the cache's entries")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    if args.list_encoders:
        print(pd.DataFrame(encoder_table()).to_string(index=False))
        return 0
    if args.list:
        from slidedata.feature_store import FeatureStore

        print(FeatureStore(args.cache).entries().to_string(index=False))
        return 0
    if not args.data:
        parser.error("--data is required")

    from embed.pipeline import embed_dataset
    from embed.encoders import EncoderLoadError

    from embed.registry import get_spec

    try:
        get_spec(args.encoder)
    except KeyError as exc:  # only the name lookup: a KeyError from deeper down is a bug and keeps its traceback
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    settings = EmbedSettings(patch_sizes=tuple(args.patch_sizes), batch_size=args.batch_size,
                             input_size=args.input_size,
                             chunk_nuclei=args.chunk_nuclei, num_workers=args.workers,
                             torch_threads=args.torch_threads,
                             stain_normalization=args.stain_normalization, compile=args.compile,
                             rank=rank, world_size=world)
    start = time.perf_counter()

    def stage() -> int:
        reports = embed_dataset(args.data, args.cache, args.encoder, args.weights, settings, device,
                                microns_per_pixel=args.microns_per_pixel,
                                force_microns_per_pixel=args.force_microns_per_pixel)
        for r in reports:
            print(f"{r.sample}: {r.nuclei} nuclei, computed {r.units_computed} of {r.units_total} chunks "
                  f"in {r.seconds:.1f} s")
        print(f"embed: {time.perf_counter() - start:.1f} s, cache {args.cache}")
        return 0

    return run_reporting_input_errors(stage, args.debug, (EncoderLoadError,))


if __name__ == "__main__":
    sys.exit(main())
