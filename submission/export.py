"""Cached features out as AnnData, for scanpy / squidpy (cluster the nuclei, plot them on the tissue).

    he2expr export --cache outputs/features.zarr --out outputs/features [--data DIR] [--samples S ...]
                   [--encoder NAME] [--patch-sizes 64 ...]

One `<sample>.h5ad` per sample of the cache: a row per nucleus in the cache's order, `obsm['X_<encoder>_<size>']`
the features of each cached entry (float32 of the stored float16), `obsm['spatial']` the nucleus centre (x, y) in
slide pixels (`uns['microns_per_pixel']` converts), `obs['cell_id']`. With `--data` (the samples that were
embedded), `cell_id` is written as the sample gives it (e.g. Xenium's strings) and `obs['group']` is added.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from slidedata.errors import DataError
from slidedata.feature_store import FeatureStore
from slidedata.patch_size import PatchSize
from slidedata.publish import check_writable, publishing
from slidedata.sample import Elements, open_samples


def obsm_key(encoder: str, patch_size: str) -> str:
    return f"X_{encoder}_{PatchSize.parse(patch_size).key}"


def features_anndata(store: FeatureStore, sample_name: str, entries: pd.DataFrame, sample=None):
    """The AnnData of one sample's cached `entries` (rows of `FeatureStore.entries()`), ids named by `sample`."""
    import anndata as ad

    nuclei = store.read_nuclei(sample_name)
    cell_ids = nuclei["cell_id"].to_numpy(np.int64)
    written = cell_ids if sample is None else sample.names_of(cell_ids)
    obs = pd.DataFrame({"cell_id": written}, index=[str(c) for c in written])
    if sample is not None:
        obs["group"] = sample.group_of(cell_ids)
    table = ad.AnnData(obs=obs)
    table.obsm["spatial"] = nuclei[["x", "y"]].to_numpy(np.float64)
    microns = None
    for row in entries.itertuples():
        entry = store.open_entry(sample_name, row.encoder, row.patch_size)
        if not np.array_equal(entry.cell_ids(), cell_ids):
            raise DataError(entry.path, "cell_id", "rows in another order than the sample's nuclei table: a cache "
                                                   "of another version; embed again")
        table.obsm[obsm_key(row.encoder, row.patch_size)] = entry.read()
        microns = entry.attrs.get("sample_microns_per_pixel", microns)
    table.uns["microns_per_pixel"] = float(microns) if microns is not None else float("nan")
    table.uns["spatial_units"] = "slide pixels (x, y)"
    return table


def export_features(cache: str | Path, out_dir: str | Path, samples: list[str] | None = None,
                    encoder: str | None = None, patch_sizes: list | None = None, data: str | Path | None = None,
                    elements: Elements | None = None) -> list[Path]:
    """Write `<out_dir>/<sample>.h5ad` for the cached samples (all, or `samples`), every complete entry of
    `encoder` (default: every encoder) at `patch_sizes` (default: every size); returns the paths."""
    store = FeatureStore(cache, create=False)  # only reads
    check_writable(out_dir)
    entries = store.entries()
    if encoder is not None:
        entries = entries[entries["encoder"] == encoder]
    if patch_sizes:
        entries = entries[entries["patch_size"].isin([PatchSize.parse(s).key for s in patch_sizes])]
    names = list(samples) if samples else sorted(entries["sample"].unique())
    missing = [n for n in names if n not in set(entries["sample"])]
    if missing or not names:
        raise DataError(cache, "-", f"no cached features for sample(s) {missing or 'any'} with the encoder and patch "
                                    f"sizes asked for (cached: {sorted(set(store.entries()['sample']))}); "
                                    "run the embed stage first")
    by_name = {s.name: s for s in open_samples(data, elements=elements)} if data is not None else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        table = features_anndata(store, name, entries[entries["sample"] == name], by_name.get(name))
        with publishing(out_dir / f"{name}.h5ad") as tmp:
            table.write_h5ad(tmp)
        paths.append(out_dir / f"{name}.h5ad")
    return paths


def main(argv: list[str] | None = None, prog: str = "python -m submission.export") -> int:
    from slidedata.cli import (DefaultsHelpFormatter, StageParser, add_output_flags, add_sample_arguments,
                               elements_from_args, run_reporting_input_errors)
    from slidedata.patch_size import patch_size_arg

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--cache", default="outputs/features.zarr", help="the feature cache the embed stage wrote")
    parser.add_argument("--out", required=True, help="folder for one <sample>.h5ad per sample")
    parser.add_argument("--samples", nargs="+", help="these samples only (default: every sample of the cache)")
    parser.add_argument("--encoder", help="this encoder's features only (default: every cached encoder)")
    parser.add_argument("--patch-sizes", nargs="+", type=patch_size_arg, help="these sizes only (default: all)")
    parser.add_argument("--data", help="the embedded samples: write cell ids as they give them, add obs['group']")
    add_sample_arguments(parser)
    add_output_flags(parser)
    args = parser.parse_args(argv)

    def stage() -> int:
        paths = export_features(args.cache, args.out, args.samples, args.encoder, args.patch_sizes, args.data,
                                elements_from_args(args))
        for path in paths:
            print(f"wrote {path}")
        return 0

    return run_reporting_input_errors(stage, args)


if __name__ == "__main__":
    sys.exit(main())
