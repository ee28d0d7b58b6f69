"""Predictions as AnnData (what scanpy / spatialdata users open next), optionally written into the sample's zarr."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from slidedata.publish import publishing, publishing_folder
from submission.predict import SamplePredictions

PREDICTION_TABLE = "predicted_expression"


def to_anndata(predictions: SamplePredictions) -> ad.AnnData:
    """obs = held-out nuclei (index str(cell_id), column cell_id), var = genes, X = predicted log1p expression."""
    ids = predictions.written_ids
    obs = pd.DataFrame({"cell_id": ids if predictions.names is not None else ids.astype(np.int64)},
                       index=[str(c) for c in ids])
    table = ad.AnnData(X=predictions.values.astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=list(predictions.genes)))
    table.uns["prediction"] = {"sample": predictions.sample, "units": "log1p(counts / total * 100)"}
    return table


def write_anndata(predictions: list[SamplePredictions], folder: str | Path) -> list[Path]:
    """One `<sample>.h5ad` per sample, each put in place only once complete (`slidedata.publish`)."""
    folder = Path(folder)
    paths = []
    for p in predictions:
        with publishing(folder / f"{p.sample}.h5ad") as tmp:
            to_anndata(p).write_h5ad(tmp)
        paths.append(folder / f"{p.sample}.h5ad")
    return paths


def add_to_spatialdata(sample_path: str | Path, predictions: SamplePredictions,
                       table_name: str = PREDICTION_TABLE) -> None:
    """Store the predictions as a table of the sample's SpatialData zarr, replacing an older one of that name.

    The table is written beside the old one under a hidden temporary name (spatialdata's reader skips names that
    start with a dot) and swapped in as a folder: a writer killed at any point leaves the old table (or none) or the
    new one complete. The zarr's consolidated metadata, which is how readers list the tables, is refreshed after
    the swap; until then a reader lists the tables as they were (a table new by name is not listed yet, a replaced
    one is read from its folder, hence new).
    """
    import zarr
    from spatialdata._io import write_table  # what SpatialData.write_element calls; the public API cannot write
    from spatialdata.models import TableModel  # an element under a name other than its own

    sample_path = Path(sample_path)
    table = TableModel.parse(to_anndata(predictions))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = zarr.open_group(sample_path, mode="r+", use_consolidated=False).require_group("tables")
        with publishing_folder(sample_path / "tables" / table_name) as tmp:
            write_table(table, tables, tmp.name)
        if zarr.open_group(sample_path, mode="r").metadata.consolidated_metadata is not None:
            zarr.consolidate_metadata(zarr.open_group(sample_path, mode="r+", use_consolidated=False).store)
