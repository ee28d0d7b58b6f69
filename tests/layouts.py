"""Test helpers: samples rewritten as the field stores single cells (spatialdata-io's element names, string cell
ids, one table holding the group as a column, nuclei as labels or as polygons)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from slidedata.sample import Elements, dense, open_sample

# spatialdata-io's Xenium names, with the H&E as `xenium_aligned_image` adds it
IO_ELEMENTS = dict(image="he_image", table="table", groups="table", group_column="split")


def string_id(cell_id: int) -> str:
    """A Xenium-like id ('aaaadnje-1'): eight letters from the integer, then the dataset suffix."""
    letters, n = [], int(cell_id)
    for _ in range(8):
        n, digit = divmod(n, 16)
        letters.append(chr(ord("a") + digit))
    return "".join(reversed(letters)) + "-1"


def rewrite_spatialdata_io_style(src: Path, dst: Path, nuclei: str = "labels") -> Elements:
    """Write the sample `src` (challenge layout) again at `dst` as spatialdata-io would lay a Xenium run out:
    image 'he_image', one table 'table' with string cell ids and the group in obs['split'] (unmeasured rows with
    zero counts), nuclei as labels 'nucleus_labels' (obs['label_id'] = the mask value) or as polygons
    'nucleus_boundaries' (one square per nucleus's bounding box, in microns, with a Scale to the image's pixels).
    Returns the Elements that read it back."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel
    from spatialdata.transformations import Identity

    sample = open_sample(src)
    mask = np.asarray(sample.mask)
    ids = sample.groups.index.to_numpy(np.int64)
    names = np.array([string_id(i) for i in ids], dtype=object)
    genes = sample.genes
    values, measured = sample.expression_of(ids)
    counts = np.zeros((len(ids), len(genes)), dtype=np.float32)
    if measured.any():
        original = sd.read_zarr(src).tables["anucleus"]
        rows = pd.Index(original.obs["cell_id"].to_numpy(np.int64)).get_indexer(ids[measured])
        counts[measured] = dense(original.layers["counts"][rows])
    obs = pd.DataFrame({"cell_id": names, "split": sample.groups.to_numpy(), "label_id": ids,
                        "region": "nucleus_labels"}, index=names)
    obs["region"] = obs["region"].astype("category")
    table = ad.AnnData(X=np.where(measured[:, None], values, 0).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=genes))
    table.layers["counts"] = counts
    to_pixels = {"global": Identity()}
    image = Image2DModel.parse(np.asarray(sample.image), dims=("c", "y", "x"), transformations=dict(to_pixels))
    elements = dict(images={"he_image": image})
    if nuclei == "labels":
        elements["labels"] = {"nucleus_labels": Labels2DModel.parse(mask, dims=("y", "x"),
                                                                     transformations=dict(to_pixels))}
        table = TableModel.parse(table, region="nucleus_labels", region_key="region", instance_key="label_id")
        names_of = Elements(nuclei="nucleus_labels", **IO_ELEMENTS)
    else:
        elements["shapes"] = {"nucleus_boundaries": nucleus_squares(sample, names)}
        table.obs = table.obs.drop(columns="label_id")
        table.obs["region"] = pd.Categorical(["nucleus_boundaries"] * table.n_obs)
        table = TableModel.parse(table, region="nucleus_boundaries", region_key="region", instance_key="cell_id")
        names_of = Elements(nuclei="nucleus_boundaries", **IO_ELEMENTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.SpatialData(**elements, tables={"table": table}).write(dst)
    return names_of


MICRONS_PER_PIXEL = 0.5  # the polygons' unit in `nucleus_squares`: a Scale of 2 takes them to pixels


def nucleus_squares(sample, names: np.ndarray):
    """One polygon per nucleus of `sample`: the outline of its mask bounding box, in microns, a Scale to pixels."""
    import geopandas as gpd
    from shapely.geometry import Polygon
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    nuclei = sample.nuclei().set_index("cell_id").loc[sample.groups.index]
    squares = [Polygon(np.array([(x0, y0), (x1 + 1, y0), (x1 + 1, y1 + 1), (x0, y1 + 1)]) * MICRONS_PER_PIXEL)
               for y0, y1, x0, x1 in nuclei[["y_min", "y_max", "x_min", "x_max"]].to_numpy()]
    frame = gpd.GeoDataFrame(geometry=squares, index=pd.Index(names, name="cell_id"))
    return ShapesModel.parse(frame, transformations={"global": Scale([1 / MICRONS_PER_PIXEL] * 2, axes=("x", "y"))})
