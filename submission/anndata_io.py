"""Predictions as AnnData (what scanpy / spatialdata users open next), optionally written into the sample's zarr."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from submission.predict import SamplePredictions

PREDICTION_TABLE = "predicted_expression"


def to_anndata(predictions: SamplePredictions) -> ad.AnnData:
    """obs = held-out nuclei (index str(cell_id), column cell_id), var = genes, X = predicted log1p expression."""
    obs = pd.DataFrame({"cell_id": predictions.cell_ids.astype(np.int64)},
                       index=[str(c) for c in predictions.cell_ids])
    table = ad.AnnData(X=predictions.values.astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=list(predictions.genes)))
    table.uns["prediction"] = {"sample": predictions.sample, "units": "log1p(counts / total * 100)"}
    return table


def write_anndata(predictions: list[SamplePredictions], folder: str | Path) -> list[Path]:
    """One `<sample>.h5ad` per sample, each written under a temporary name first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in predictions:
        final, tmp = folder / f"{p.sample}.h5ad", folder / f".{p.sample}.h5ad.tmp"
        to_anndata(p).write_h5ad(tmp)
        tmp.replace(final)
        paths.append(final)
    return paths


def add_to_spatialdata(sample_path: str | Path, predictions: SamplePredictions,
                       table_name: str = PREDICTION_TABLE) -> None:
    """Store the predictions as a new table of the sample's SpatialData zarr (replacing an older one of that name)."""
    import spatialdata as sd
    from spatialdata.models import TableModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(sample_path)
        sdata.tables[table_name] = TableModel.parse(to_anndata(predictions))
        if table_name in sd.read_zarr(sample_path).tables:
            sdata.delete_element_from_disk(table_name)
        sdata.write_element(table_name)
