"""Samples laid out as the field stores single cells: other element names, string cell ids, one table with the group
as a column, nuclei as polygons (slidedata.sample.Elements, slidedata.polygons)."""

import warnings

import numpy as np
import pandas as pd
import pytest

from slidedata.errors import DataError
from slidedata.sample import Elements, open_sample
from tests.layouts import rewrite_spatialdata_io_style, string_id


@pytest.fixture(autouse=True)
def mask_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HE2EXPR_MASK_CACHE", str(tmp_path / "masks"))
    return tmp_path / "masks"


def test_string_ids_and_other_names_read_as_the_original(demo_dir, tmp_path):
    original = open_sample(demo_dir / "demo1.zarr")
    elements = rewrite_spatialdata_io_style(demo_dir / "demo1.zarr", tmp_path / "demo1.zarr", "labels")
    sample = open_sample(tmp_path / "demo1.zarr", elements=elements)

    pd.testing.assert_series_equal(sample.groups.sort_index(), original.groups.sort_index())
    np.testing.assert_array_equal(np.asarray(sample.mask), np.asarray(original.mask))
    ids = original.expression.obs["cell_id"].to_numpy(np.int64)
    np.testing.assert_array_equal(sample.expression_of(ids)[0], original.expression_of(ids)[0])
    # the ids as given, for every nucleus of the mask, from the mask values inside
    assert list(sample.names_of(ids[:3])) == [string_id(i) for i in ids[:3]]
    assert original.id_names is None and list(original.names_of(ids[:3])) == list(ids[:3])
    # one table for both: its test rows are left out of the expression, as the challenge leaves them out
    test_ids = original.groups.index[original.groups == "test"]
    assert not sample.expression.obs["cell_id"].isin(test_ids).any()


def test_string_ids_need_a_way_to_the_mask(demo_dir, tmp_path):
    elements = rewrite_spatialdata_io_style(demo_dir / "demo1.zarr", tmp_path / "demo1.zarr", "labels")
    unmapped = Elements(**{**vars(elements), "label_column": "no_such_column"})
    with pytest.raises(DataError, match="not integers .*'aaaa.*--label-column"):
        open_sample(tmp_path / "demo1.zarr", elements=unmapped)
    with pytest.raises(DataError, match="obs has no 'no_such_group' column"):
        open_sample(tmp_path / "demo1.zarr", elements=Elements(**{**vars(elements), "group_column": "no_such_group"}))


def _shape(outline):
    """A polygon from its vertices, or a multipolygon from a list of vertex lists."""
    from shapely.geometry import MultiPolygon, Polygon

    return MultiPolygon([Polygon(p) for p in outline]) if isinstance(outline[0][0], tuple) else Polygon(outline)


def _polygon_sample(path, polygons: dict, scale: float = 2.0, shape=(40, 48)):
    """An image, and polygons in units of `scale` pixels (a Scale to the image's coordinate system); a table
    naming each polygon's cell."""
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    geometry = [_shape(v) for v in polygons.values()]
    frame = gpd.GeoDataFrame(geometry=geometry, index=pd.Index(list(polygons), name="cell_id"))
    shapes = ShapesModel.parse(frame, transformations={"global": Scale([scale, scale], axes=("x", "y"))})
    image = Image2DModel.parse(np.full((3, *shape), 200, np.uint8), dims=("c", "y", "x"),
                               transformations={"global": Identity()})
    obs = pd.DataFrame({"cell_id": list(polygons), "split": "test",
                        "region": pd.Categorical(["nuclei"] * len(polygons))}, index=list(polygons))
    table = TableModel.parse(ad.AnnData(obs=obs), region="nuclei", region_key="region", instance_key="cell_id")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.SpatialData(images={"he": image}, shapes={"nuclei": shapes}, tables={"cells": table}).write(path)
    return Elements(image="he", nuclei="nuclei", table="cells", groups="cells", group_column="split")


def test_polygons_become_the_pixels_whose_centres_they_hold_once(tmp_path, mask_cache, monkeypatch):
    import shapely

    import slidedata.polygons as polygons_module

    polygons = {  # cell-b: two nuclei of one cell; vertices off the grid (no pixel centre on an edge)
        "cell-a": [(2.1, 2.3), (9.2, 2.6), (8.3, 9.1), (3.05, 8.2)],
        "cell-b": [[(12.1, 3.3), (16.2, 3.1), (14.1, 8.3)], [(18.1, 10.2), (22.3, 10.1), (22.2, 14.3), (18.2, 14.1)]],
        "cell-c": [(6.1, 6.2), (12.3, 6.1), (12.2, 12.3), (6.2, 12.1)],  # overlaps cell-a: the earlier keeps its pixels
    }
    elements = _polygon_sample(tmp_path / "s.zarr", polygons)
    calls, draw = [], polygons_module.polygon_mask
    monkeypatch.setattr(polygons_module, "polygon_mask", lambda *a, **k: calls.append(1) or draw(*a, **k))
    sample = open_sample(tmp_path / "s.zarr", elements=elements)

    # reference: shapely, pixel centres (x + 0.5, y + 0.5) taken back to the polygons' units (/ 2)
    yy, xx = np.mgrid[:40, :48]
    expected = np.zeros((40, 48), np.int64)
    for value, (name, outline) in enumerate(polygons.items(), start=1):
        shape = _shape(outline)
        inside = shapely.contains_xy(shape, (xx + 0.5) / 2, (yy + 0.5) / 2) & (expected == 0)
        expected[inside] = value
    np.testing.assert_array_equal(np.asarray(sample.mask), expected)
    assert list(sample.names_of([1, 2, 3])) == ["cell-a", "cell-b", "cell-c"]
    assert sorted(sample.groups.index) == [1, 2, 3]

    again = open_sample(tmp_path / "s.zarr", elements=elements)  # read from the cache, not drawn again
    np.testing.assert_array_equal(np.asarray(again.mask), expected)
    assert len(calls) == 1 and len(list(mask_cache.iterdir())) == 1
    assert sample.input_digest() == again.input_digest()


def _with_string_ids(src, dst, label_column: bool) -> None:
    """The sample `src` in the challenge's layout, its tables' cell_id as 'cell_<n>' (issue 23, case 2), with the
    mask value in obs['label_id'] or not."""
    import spatialdata as sd

    sdata = sd.read_zarr(src)
    for name in ("anucleus", "cell_id-group"):
        obs = sdata.tables[name].obs
        if label_column:
            obs["label_id"] = obs["cell_id"].astype(np.int64)
        obs["cell_id"] = [f"cell_{int(i)}" for i in obs["cell_id"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(dst)


def test_string_ids_in_the_challenge_layout_work_or_are_one_error_line(demo_dir, tmp_path, capsys):
    """Issue 23, case 2: 'cell_7' ids were a ValueError traceback. With their mask values (obs['label_id']) they
    are read and written back as given; without, one error line names the file and what is missing."""
    from submission.cli import main as he2expr

    _with_string_ids(demo_dir / "demo1.zarr", tmp_path / "bare" / "demo1.zarr", label_column=False)
    assert he2expr(["validate", str(tmp_path / "x.csv"), "--data", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "demo1.zarr" in err[0] and "label_id" in err[0]

    _with_string_ids(demo_dir / "demo1.zarr", tmp_path / "mapped" / "demo1.zarr", label_column=True)
    sample, original = open_sample(tmp_path / "mapped" / "demo1.zarr"), open_sample(demo_dir / "demo1.zarr")
    pd.testing.assert_series_equal(sample.groups, original.groups)
    held = original.groups.index[original.groups != "train"].to_numpy()
    assert list(sample.names_of(held[:3])) == [f"cell_{i}" for i in held[:3]]
