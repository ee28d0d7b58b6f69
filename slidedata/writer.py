"""Write a Crunch-format sample zarr: the one writer behind the demo data (`synthetic`) and the spot-data importer
(`importers`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from slidedata.publish import publishing_folder
from slidedata.sample import EXPRESSION, GROUPS, IMAGE, MASK, MICRONS, log_normalise


def anucleus_table(cell_ids: np.ndarray, counts: np.ndarray, genes: list[str], spatial_xy_um: np.ndarray,
                     extra_obs: dict | None = None):
    """AnnData laid out like the challenge's `anucleus`: obs['cell_id'] (and `extra_obs` columns), var = genes,
    X = log1p(counts / total * 100) as float32, layers['counts'], obsm['spatial'] in microns, (x, y) order.
    Integer ids are stored as int64; other ids (Xenium's strings) as given, with the mask value of each cell in
    an `extra_obs` column (`slidedata.sample.LABEL_COLUMN`)."""
    import anndata as ad

    cell_ids = np.asarray(cell_ids)
    ids = cell_ids.astype(np.int64) if np.issubdtype(cell_ids.dtype, np.integer) else cell_ids.astype(str)
    obs = pd.DataFrame({"cell_id": ids, **(extra_obs or {})}, index=[str(c) for c in cell_ids])
    table = ad.AnnData(X=log_normalise(counts).astype(np.float32), obs=obs,
                       var=pd.DataFrame({"gene_symbols": genes}, index=genes))
    table.layers["counts"] = counts
    table.obsm["spatial"] = spatial_xy_um
    return table


def write_sample(path: str | Path, image, mask, groups: pd.DataFrame, expression=None, chunk_size: int = 512,
                 microns_per_pixel: float | None = None) -> Path:
    """Write a sample zarr atomically: built under a temporary name, then swapped in (`slidedata.publish`).

    `image` (3, H, W) uint8, `mask` (H, W) integer cell ids (numpy, or dask arrays computed chunk by chunk while
    writing), `groups` a frame with `cell_id` and `group`, `expression` an AnnData laid out like `anucleus` (or None).
    The pixel size, when known, is stored the SpatialData way: a scale transformation of both image elements to a
    coordinate system named 'microns'.
    """
    return write_sample_tables_after(path, image, mask, lambda: (groups, expression), chunk_size, microns_per_pixel)


def write_sample_tables_after(path: str | Path, image, mask, tables: Callable[[], tuple[pd.DataFrame, object]],
                              chunk_size: int = 512, microns_per_pixel: float | None = None) -> Path:
    """`write_sample` whose tables are made by `tables()` -> (groups, expression or None) once the images are
    written: a writer rendering the mask tile by tile learns only then which nuclei it holds."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Identity, Scale

    path = Path(path)
    transformations = {"global": Identity()}
    if microns_per_pixel is not None:
        if not microns_per_pixel > 0:
            raise ValueError(f"microns_per_pixel must be positive, got {microns_per_pixel}")
        transformations[MICRONS] = Scale([microns_per_pixel, microns_per_pixel], axes=("y", "x"))
    images = {
        IMAGE: Image2DModel.parse(_unnamed_dask(image, (3, chunk_size, chunk_size)), dims=("c", "y", "x"),
                                  transformations=dict(transformations)),
        MASK: Image2DModel.parse(_unnamed_dask(mask[None], (1, chunk_size, chunk_size)), dims=("c", "y", "x"),
                                 transformations=dict(transformations)),
    }
    with warnings.catch_warnings(), publishing_folder(path) as tmp:
        warnings.simplefilter("ignore")
        sdata = sd.SpatialData(images=images)
        sdata.write(tmp)
        groups, expression = tables()
        group_table = ad.AnnData(obs=groups.set_index(groups["cell_id"].astype(str).to_numpy()))
        sdata.tables[GROUPS] = TableModel.parse(group_table)
        sdata.write_element(GROUPS)
        if expression is not None:
            sdata.tables[EXPRESSION] = TableModel.parse(expression)
            sdata.write_element(EXPRESSION)
    return path


def _unnamed_dask(array, chunks: tuple[int, int, int]):
    """An image in memory as a dask array of `chunks` named at random: given the numpy array, spatialdata's parse
    also hashes all its bytes for a name (with dask's copy, 0.7 s for 3 x 8000 x 8000; 0.03 s without the hash).
    A dask array keeps its name and is rechunked, as the parse would."""
    import dask.array as da

    if isinstance(array, da.Array):
        return array.rechunk(chunks)
    return da.from_array(array, chunks=chunks, name=False)
