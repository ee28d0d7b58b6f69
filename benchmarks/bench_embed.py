"""Embedding throughput: the whole embed stage on one big sample, then patch cutting alone and cutting + encoding per
encoder and batch size on the demo data.

    python benchmarks/bench_embed.py --data data/demo [--encoders handcrafted resnet50 uni] [--batch-sizes 64 256]

The first row is what a user waits for: `embed_sample` with default settings (all four patch sizes, the handcrafted
encoder, a fresh cache: nuclei table, cutting, encoding, writing) on a demo sample of `--e2e-nuclei` nuclei, generated
once under outputs/.

Neural encoders run with randomly initialised weights here: this measures speed only, never features.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from embed.encoders import PatchEncoder, _build_timm, load_encoder
from embed.patches import PatchCut, UnitPatchDataset
from embed.pipeline import EmbedSettings, embed_sample, encode_patches
from embed.registry import get_spec
from slidedata.feature_store import FeatureStore
from slidedata.sample import open_samples


def benchmark_encoder(name: str, device: str) -> PatchEncoder:
    spec = get_spec(name)
    if spec.library == "handcrafted":
        return load_encoder(spec, device=device)
    return PatchEncoder(spec, _build_timm(spec), weights_sha256="random-init (speed only)").to(device)


def end_to_end(nuclei: int, folder: Path, device: str) -> dict:
    """embed_sample with default settings on a fresh cache; the sample is generated once and reused."""
    from synthetic.demo import make_demo_sample

    path = folder / f"demo-{nuclei}.zarr"
    if not path.exists():
        print(f"generating a demo sample of ~{nuclei} nuclei under {folder} (once) ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        make_demo_sample(path, 1, nuclei, True)
    sample = next(iter(open_samples(path)))
    cache = folder / "e2e-features.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    settings = EmbedSettings()
    start = time.perf_counter()
    report = embed_sample(sample, FeatureStore(cache), load_encoder("handcrafted", device=device), settings,
                          progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    return {"stage": "embed_sample", "encoder": "handcrafted", "batch": settings.batch_size, "device": device,
            "nuclei": report.nuclei, "patches/s": report.nuclei * len(settings.patch_sizes) / seconds,
            "nuclei/s": report.nuclei / seconds, "per core (patches/s)": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--cache", default="outputs/bench-features.zarr")
    parser.add_argument("--encoders", nargs="+", help="default: handcrafted resnet50 (CPU); + uni, a ViT-L/16 (GPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    parser.add_argument("--max-nuclei", type=int, help="nuclei per encoder timing (default: 256 on CPU, 8192 on GPU)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--e2e-nuclei", type=int, default=20000,
                        help="nuclei of the sample embedded end to end (0: skip that row)")
    parser.add_argument("--e2e-data", default="outputs/bench-embed-data", help="where that sample is kept")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.encoders = args.encoders or (["handcrafted", "resnet50", "uni"] if on_gpu else ["handcrafted", "resnet50"])
    args.max_nuclei = args.max_nuclei or (8192 if on_gpu else 64)

    rows = []
    if args.e2e_nuclei:
        rows.append(end_to_end(args.e2e_nuclei, Path(args.e2e_data), args.device))
        print(rows[-1], flush=True)

    sample = next(s for s in open_samples(args.data))
    store = FeatureStore(args.cache)
    nuclei = store.nuclei(sample)
    tile = store.tile_size(sample.name)
    chunk = min(512, args.max_nuclei)
    units = list(range(-(-len(nuclei) // chunk)))
    # Whole crops, as a network resampling them itself is given (the handcrafted encoder's wide crops are shrunk while
    # cut: see the embed_sample row).
    cuts = tuple(PatchCut(size, size) for size in args.patch_sizes)

    def cut_all(limit_units=None):
        ds = UnitPatchDataset(sample, nuclei, units[:limit_units], chunk, cuts, tile, True)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
        return loader

    start, count = time.perf_counter(), 0
    for item in cut_all():
        count += next(iter(item.patches.values())).shape[0]
    seconds = time.perf_counter() - start
    rows.append({"stage": "cut", "encoder": "-", "batch": "-", "device": "cpu", "nuclei": count,
                 "patches/s": count * len(args.patch_sizes) / seconds, "nuclei/s": count / seconds,
                 "per core (patches/s)": count * len(args.patch_sizes) / seconds / max(args.workers, 1)})
    print(rows[-1], flush=True)

    for name in args.encoders:
        encoder = benchmark_encoder(name, args.device)
        if args.device.startswith("cuda"):
            encoder = encoder.to(memory_format=torch.channels_last)
        model = torch.compile(encoder) if args.compile else encoder
        for batch in args.batch_sizes:
            settings = EmbedSettings(batch_size=batch)
            limit = max(1, args.max_nuclei // chunk)
            warm = next(iter(cut_all(1)))
            encode_patches(model, warm.patches[args.patch_sizes[0]][:batch], warm.masks[args.patch_sizes[0]][:batch],
                           settings, torch.device(args.device))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
            for item in cut_all(limit):
                for size in args.patch_sizes:
                    encode_patches(model, item.patches[size], item.masks.get(size), settings,
                                   torch.device(args.device))
                count += next(iter(item.patches.values())).shape[0]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append({"stage": "cut+encode", "encoder": name, "batch": batch, "device": args.device,
                         "nuclei": count, "patches/s": count * len(args.patch_sizes) / seconds,
                         "nuclei/s": count / seconds, "per core (patches/s)": float("nan")})
            print(rows[-1], flush=True)

    print(f"\nsample {sample.name}: {len(nuclei)} nuclei, patch sizes {args.patch_sizes}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} (embed_sample: default settings, "
          "default DataLoader workers)")
    with pd.option_context("display.float_format", "{:.1f}".format, "display.width", 140):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
