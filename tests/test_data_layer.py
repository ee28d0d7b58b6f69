import numpy as np
import pandas as pd
import pytest
import dask.array as da

from slidedata import DataError, nuclei_from_mask, open_sample, open_samples
from slidedata.writer import write_sample
from synthetic.demo import expression_table, simulate_tissue


def test_open_folder_of_demo_samples(demo_dir):
    samples = open_samples(demo_dir)
    assert [s.name for s in samples] == ["demo0", "demo1", "demo2"]
    no_expression, with_expression = samples[0], samples[1]
    assert not no_expression.has_expression and with_expression.has_expression
    assert len(with_expression.genes) == 460
    assert with_expression.image.dtype == np.uint8 and with_expression.image.shape[0] == 3
    assert with_expression.mask.shape == with_expression.image.shape[1:]
    # Test nuclei are held out of the expression table; validation nuclei are measured (a local scoring set).
    measured = set(with_expression.expression.obs["cell_id"])
    groups = with_expression.groups
    assert not measured & set(groups.index[groups == "test"])
    assert set(groups.index[groups == "validation"]) <= measured


def test_expression_is_log1p_of_counts_per_100(demo_dir):
    import spatialdata as sd

    table = sd.read_zarr(demo_dir / "demo1.zarr").tables["anucleus"]
    counts = np.asarray(table.layers["counts"], dtype=np.float64)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 100)
    np.testing.assert_allclose(np.asarray(table.X), expected, rtol=1e-5, atol=1e-6)
    assert (counts == 0).mean() > 0.5  # sparse like Xenium
    assert table.obs["cell_id"].max() > 5 * table.n_obs  # ids are not contiguous


def test_nuclei_every_table_id_is_in_mask(demo_dir):
    sample = open_sample(demo_dir / "demo1.zarr")
    nuclei = sample.nuclei()
    assert set(sample.groups.index) == set(nuclei["cell_id"])


def _brute_force(mask: np.ndarray) -> pd.DataFrame:
    rows = []
    for cid in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == cid)
        rows.append((cid, ys.mean(), xs.mean(), len(ys), ys.min(), ys.max(), xs.min(), xs.max()))
    return pd.DataFrame(rows, columns=["cell_id", "y", "x", "area", "y_min", "y_max", "x_min", "x_max"])


def test_streaming_nuclei_match_brute_force_across_chunk_borders():
    rng = np.random.default_rng(0)
    mask = np.zeros((70, 90), dtype=np.uint32)
    for cid in rng.choice(10_000, 25, replace=False) + 1:
        y, x = rng.integers(0, 64), rng.integers(0, 84)
        mask[y: y + rng.integers(2, 8), x: x + rng.integers(2, 8)] = cid
    streamed = nuclei_from_mask(da.from_array(mask, chunks=(16, 16)))  # nuclei straddle chunk borders
    expected = _brute_force(mask)
    assert len(streamed) == len(expected)
    for column in expected.columns:
        np.testing.assert_allclose(streamed[column].to_numpy(float), expected[column].to_numpy(float))


def test_ellipse_axes_of_a_rectangle():
    mask = np.zeros((40, 40), dtype=np.uint32)
    mask[10:14, 5:25] = 3  # 4 x 20 px bar lying along x
    row = nuclei_from_mask(da.from_array(mask, chunks=(8, 8))).iloc[0]
    # 20 pixel centres in a row have the variance of 0..19, (20^2 - 1) / 12: the ellipse with the same second
    # moments has a major axis of 4 * sqrt(that), as regionprops gives (pixels as points, see test_nuclei_geometry).
    assert row["major_axis"] == pytest.approx(4 * np.sqrt((20**2 - 1) / 12), rel=1e-6)
    assert row["minor_axis"] == pytest.approx(4 * np.sqrt((4**2 - 1) / 12), rel=1e-6)
    assert row["major_axis"] > 4 * row["minor_axis"] > 0
    assert row["eccentricity"] > 0.95


def test_demo_is_deterministic():
    a, b = simulate_tissue(200, seed=3), simulate_tissue(200, seed=3)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["counts"], b["counts"])
    assert not np.array_equal(a["image"], simulate_tissue(200, seed=4)["image"])


# -- validation errors: each names the file and the element ----------------------------------------------------

@pytest.fixture()
def parts():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    mask = np.zeros((40, 50), dtype=np.uint32)
    mask[5:10, 5:10], mask[20:25, 30:35], mask[30:35, 10:15] = 11, 42, 97
    groups = pd.DataFrame({"cell_id": [11, 42, 97], "group": ["train", "train", "test"]})
    counts = rng.integers(1, 5, (2, 460))
    expression = expression_table(np.array([11, 42]), counts, np.array([7.0, 22.0]), np.array([7.0, 32.0]))
    return dict(image=image, mask=mask, groups=groups, expression=expression)


def _write(tmp_path, parts, **override):
    values = {**parts, **override}
    return write_sample(tmp_path / "s.zarr", values["image"], values["mask"], values["groups"],
                        values["expression"], chunk_size=16)


def _expect(path, element, words, open_fn=open_sample):
    with pytest.raises(DataError) as info:
        sample = open_fn(path)
        sample.nuclei()
    message = str(info.value)
    assert str(path) in message and element in message, message
    assert words in message, message


def test_valid_parts_open(tmp_path, parts):
    sample = open_sample(_write(tmp_path, parts))
    assert sample.has_expression and len(sample.nuclei()) == 3


def test_missing_element(tmp_path, parts):
    import spatialdata as sd

    path = _write(tmp_path, parts)
    sd.read_zarr(path).delete_element_from_disk("cell_id-group")
    _expect(path, "cell_id-group", "element missing")


def test_table_ids_absent_from_mask(tmp_path, parts):
    groups = pd.DataFrame({"cell_id": [11, 42, 97, 5000], "group": ["train", "train", "test", "test"]})
    _expect(_write(tmp_path, parts, groups=groups), "cell_id-group", "not in the mask")


def test_any_panel_opens_unless_a_size_is_demanded(tmp_path, parts):
    expression = expression_table(np.array([11, 42]), np.ones((2, 300), int), np.zeros(2), np.zeros(2))
    path = _write(tmp_path, parts, expression=expression)
    assert len(open_sample(path).genes) == 300  # the panel comes from the data
    _expect(path, "anucleus", "expected 460 genes, found 300", lambda p: open_sample(p, n_genes=460))


def test_nan_expression(tmp_path, parts):
    expression = parts["expression"].copy()
    expression.X[0, 3] = np.nan
    _expect(_write(tmp_path, parts, expression=expression), "anucleus", "NaN")


def test_negative_expression(tmp_path, parts):
    expression = parts["expression"].copy()
    expression.X[1, 0] = -0.5
    _expect(_write(tmp_path, parts, expression=expression), "anucleus", "negative")


def test_image_and_mask_shapes_disagree(tmp_path, parts):
    _expect(_write(tmp_path, parts, mask=parts["mask"][:30]), "HE_nuc_original", "differs from")


def test_unknown_group_value(tmp_path, parts):
    groups = parts["groups"].assign(group=["train", "holdout", "test"])
    _expect(_write(tmp_path, parts, groups=groups), "cell_id-group", "unknown group")


def test_not_a_sample(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "", "no *.zarr sample", open_fn=open_samples)
    _expect(tmp_path / "nothing.zarr", "", "no such file")


def test_mask_as_labels_element_is_accepted(tmp_path, parts):
    import spatialdata as sd
    from spatialdata.models import Labels2DModel

    path = _write(tmp_path, parts)
    sdata = sd.read_zarr(path)
    del sdata.images["HE_nuc_original"]
    sdata.labels["HE_nuc_original"] = Labels2DModel.parse(parts["mask"], dims=("y", "x"))
    sdata.write(tmp_path / "labels.zarr")
    sample = open_sample(tmp_path / "labels.zarr")
    assert sorted(sample.nuclei()["cell_id"]) == [11, 42, 97]
