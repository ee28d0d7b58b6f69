"""Each damaged or changed input of issue 10, on a copy of the demo fixture: a clear one-line error, or a recompute."""

import contextlib
import importlib
import io
import multiprocessing
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from embed.encoders import load_encoder
from embed.pipeline import EmbedSettings, embed_sample
from slidedata import DataError, open_sample, open_samples
from slidedata.feature_store import FeatureStore
from slidedata.writer import write_sample
from synthetic.demo import expression_table, simulate_tissue

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(patch_sizes=(24,), chunk_nuclei=128)


def _copy(demo_dir, tmp_path, name="demo1"):
    return Path(shutil.copytree(demo_dir / f"{name}.zarr", tmp_path / f"{name}.zarr"))


def _chunk_with_nuclei(sample_path: Path) -> str:
    """The key of a mask chunk that holds nuclei (its file exists), which is also an image chunk (same grid)."""
    chunks = sorted(p.relative_to(sample_path / "images/HE_nuc_original/s0").as_posix()
                    for p in (sample_path / "images/HE_nuc_original/s0/c").rglob("*") if p.is_file())
    return chunks[len(chunks) // 2]


def _run_cli(module: str, *args: str) -> SimpleNamespace:
    """`python -m module args` in this process (a fresh interpreter would spend seconds importing torch): its exit
    status and what it printed; an exception that escapes `main` is printed as the interpreter would."""
    main = importlib.import_module(f"{module}.__main__").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_missing_image_chunk_is_named(demo_dir, tmp_path):
    path = _copy(demo_dir, tmp_path)
    key = _chunk_with_nuclei(path)
    (path / "images/HE_original/s0" / key).unlink()
    with pytest.raises(DataError) as info:
        open_sample(path)
    message = str(info.value)
    assert str(path) in message and "HE_original" in message and f"chunk {key}" in message and "missing" in message


def test_missing_mask_chunk_with_nuclei_is_refused(demo_dir, tmp_path):
    path = _copy(demo_dir, tmp_path)
    key = _chunk_with_nuclei(path)
    (path / "images/HE_nuc_original/s0" / key).unlink()
    with pytest.raises(DataError, match="HE_nuc_original|cell_id-group") as info:
        open_sample(path).nuclei()
    assert str(path) in str(info.value)


def test_missing_chunks_that_zarr_leaves_out_are_accepted(tmp_path):
    """zarr does not store chunks equal to the fill value: an empty mask chunk (and the image there) is valid."""
    image = np.full((3, 64, 64), 200, np.uint8)
    image[:, 32:, 32:] = 0  # black where the mask is empty: zarr leaves out that image chunk too
    mask = np.zeros((64, 64), np.uint32)
    mask[2:6, 2:6] = 5
    path = write_sample(tmp_path / "s.zarr", image, mask, pd.DataFrame({"cell_id": [5], "group": ["train"]}),
                        None, chunk_size=32)
    assert not (path / "images/HE_nuc_original/s0/c/0/1/1").exists()
    assert not (path / "images/HE_original/s0/c/0/1/1").exists()
    assert open_sample(path).nuclei()["cell_id"].tolist() == [5]


def test_truncated_chunk_is_named_and_the_cli_prints_one_line(demo_dir, tmp_path):
    path = _copy(demo_dir, tmp_path)
    key = _chunk_with_nuclei(path)
    chunk = path / "images/HE_original/s0" / key
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    sample = open_sample(path)
    with pytest.raises(DataError) as info:
        sample.read_image(0, sample.shape[0], 0, sample.shape[1])
    assert str(path) in str(info.value) and "HE_original" in str(info.value) and f"chunk {key}" in str(info.value)

    # raised in a DataLoader worker, it still reaches the caller as the same DataError, and the worker is gone when
    # it does (left to the collector, it was waited for 5 s in the caller's next step, then killed)
    children = set(multiprocessing.active_children())
    with pytest.raises(DataError, match=f"HE_original.*chunk {key}"):
        embed_sample(open_sample(path), FeatureStore(tmp_path / "w.zarr"), load_encoder("handcrafted"),
                     EmbedSettings(**SETTINGS, num_workers=1), progress=False)
    assert set(multiprocessing.active_children()) <= children

    result = _run_cli("embed", "--data", str(path), "--cache", str(tmp_path / "c.zarr"), "--patch-sizes", "24",
                      "--device", "cpu")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"chunk {key}" in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_truncated_mask_chunk_is_named(demo_dir, tmp_path):
    path = _copy(demo_dir, tmp_path)
    key = _chunk_with_nuclei(path)
    chunk = path / "images/HE_nuc_original/s0" / key
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(DataError, match=f"HE_nuc_original.*chunk {key}.*damaged or truncated"):
        open_sample(path).nuclei()


def test_data_changed_after_embed_is_recomputed_and_refused_by_readers(demo_dir, tmp_path):
    import zarr

    path = _copy(demo_dir, tmp_path)
    store, encoder = FeatureStore(tmp_path / "features.zarr"), load_encoder("handcrafted")
    first = embed_sample(open_sample(path), store, encoder, EmbedSettings(**SETTINGS), progress=False)
    before = store.read_features("demo1", "handcrafted", 24)

    image = zarr.open_array(path / "images/HE_original/s0", mode="r+")
    image[:, :200, :200] = 255 - image[:, :200, :200]  # same shapes, other pixels
    with pytest.raises(DataError, match="differ from those this sample was embedded from"):
        store.nuclei(open_sample(path), if_changed="raise")  # what fit and submit do

    again = embed_sample(open_sample(path), store, encoder, EmbedSettings(**SETTINGS), progress=False)
    assert again.units_computed == again.units_total == first.units_total  # everything recomputed, nothing reused
    after = store.read_features("demo1", "handcrafted", 24)
    fresh = FeatureStore(tmp_path / "fresh.zarr")
    embed_sample(open_sample(path), fresh, encoder, EmbedSettings(**SETTINGS), progress=False)
    np.testing.assert_array_equal(after, fresh.read_features("demo1", "handcrafted", 24))
    assert not np.array_equal(after, before)


def test_a_nuclei_table_of_other_geometry_code_is_recomputed_and_refused_by_readers(demo_dir, tmp_path):
    """Tables cached before the ellipse axes followed regionprops record no geometry version: other shape numbers."""
    import zarr

    path = demo_dir / "demo1.zarr"
    store, encoder = FeatureStore(tmp_path / "features.zarr"), load_encoder("handcrafted")
    embed_sample(open_sample(path), store, encoder, EmbedSettings(**SETTINGS, max_units=1), progress=False)
    table = zarr.open_group(tmp_path / "features.zarr" / "demo1" / "nuclei", mode="r+")
    del table.attrs["geometry_version"]
    table["major_axis"][:] = 0.0
    with pytest.raises(DataError, match="computed by another version.*run the embed stage again"):
        store.nuclei(open_sample(path), if_changed="raise")  # what fit and submit do

    again = embed_sample(open_sample(path), store, encoder, EmbedSettings(**SETTINGS), progress=False)
    assert again.units_computed == again.units_total  # its entries were discarded with it
    recomputed = store.read_nuclei("demo1")
    assert (recomputed["major_axis"] > 0).all()
    pd.testing.assert_frame_equal(recomputed, FeatureStore(tmp_path / "fresh.zarr").nuclei(open_sample(path)))


# -- expression --------------------------------------------------------------------------------------------------

def _sample_with(tmp_path, name="s", expression=None, groups=("train", "train", "test")):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    mask = np.zeros((40, 50), dtype=np.uint32)
    mask[5:10, 5:10], mask[20:25, 30:35], mask[30:35, 10:15] = 11, 42, 97
    table = pd.DataFrame({"cell_id": [11, 42, 97], "group": list(groups)})
    if expression is None:
        expression = expression_table(np.array([11, 42]), rng.integers(1, 5, (2, 460)), np.array([7.0, 22.0]),
                                      np.array([7.0, 32.0]))
    return write_sample(tmp_path / "data" / f"{name}.zarr", image, mask, table, expression, chunk_size=16)


@pytest.fixture()
def expression():
    counts = np.random.default_rng(2).integers(0, 40, (2, 460))
    return expression_table(np.array([11, 42]), counts, np.array([7.0, 22.0]), np.array([7.0, 32.0]))


def test_raw_counts_in_x_are_refused(tmp_path, expression):
    raw = expression.copy()
    raw.X = np.asarray(raw.layers["counts"], dtype=np.float32)
    del raw.layers["counts"]
    with pytest.raises(DataError, match=r"anucleus.*up to 39.*log1p\(100\).*raw counts"):
        open_sample(_sample_with(tmp_path, expression=raw))


def test_x_that_is_not_the_normalised_counts_is_refused(tmp_path, expression):
    other = expression.copy()
    other.X = np.log1p(np.asarray(other.layers["counts"], dtype=np.float32) / 1000)  # another scale factor
    with pytest.raises(DataError, match=r"anucleus.*X is not log1p\(counts / total \* 100\)"):
        open_sample(_sample_with(tmp_path, expression=other))


def test_negative_counts_are_refused(tmp_path, expression):
    negative = expression.copy()
    negative.layers["counts"] = np.asarray(negative.layers["counts"]).copy()
    negative.layers["counts"][0, 0] = -3
    with pytest.raises(DataError, match=r"anucleus.*counts cannot be negative"):
        open_sample(_sample_with(tmp_path, expression=negative))


def test_sparse_tables_read_as_dense_ones_and_are_checked_alike(tmp_path, expression):
    """X and layers['counts'] stored as CSR (as spatialdata-io writes them) read as the dense ones, and the counts'
    checked rows are compared alike."""
    from scipy import sparse

    stored = expression.copy()
    stored.X, stored.layers["counts"] = sparse.csr_matrix(stored.X), sparse.csr_matrix(stored.layers["counts"])
    opened = open_sample(_sample_with(tmp_path, "sparse", expression=stored)).expression
    np.testing.assert_array_equal(opened.X, np.asarray(expression.X, dtype=np.float32))
    assert list(opened.obs["cell_id"]) == [11, 42] and list(opened.var_names) == list(expression.var_names)

    wrong = stored.copy()
    counts = np.asarray(expression.layers["counts"]).copy()
    counts[1, :5] += 7  # the second row's counts no longer give its X
    wrong.layers["counts"] = sparse.csr_matrix(counts)
    with pytest.raises(DataError, match=r"anucleus.*X is not log1p.*row 1, gene [0-4] "):
        open_sample(_sample_with(tmp_path, "wrong", expression=wrong))


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_of_the_counts_only_the_checked_rows_are_read(tmp_path, expression, monkeypatch, layout):
    """A table's counts are as large as its X, and only ROWS_CHECKED rows of them are compared: the rest is never
    read. Here one row of two is checked, and the stored chunks of the other row are garbage: the sample opens."""
    import zarr
    from anndata.io import write_elem
    from scipy import sparse

    import slidedata.sample

    monkeypatch.setattr(slidedata.sample, "ROWS_CHECKED", 1)  # row 0 of 2
    path = _sample_with(tmp_path, expression=expression)
    counts = np.asarray(expression.layers["counts"])
    table = zarr.open_group(path / "tables/anucleus", mode="r+", use_consolidated=False)
    if layout == "dense":
        write_elem(table["layers"], "counts", counts, dataset_kwargs={"chunks": (1, 460)})
        unread = path / "tables/anucleus/layers/counts/c/1/0"
    else:
        write_elem(table["layers"], "counts", sparse.csr_matrix(counts), dataset_kwargs={"chunks": (50,)})
        first_of_row_1 = np.count_nonzero(counts[0])
        unread = path / f"tables/anucleus/layers/counts/data/c/{first_of_row_1 // 50 + 1}"
    assert unread.is_file()
    unread.write_bytes(b"not a chunk")
    with pytest.raises(Exception):  # the garbage is real: the whole layer does not read
        zarr.open_group(path / "tables/anucleus", mode="r", use_consolidated=False)["layers/counts" + (
            "" if layout == "dense" else "/data")][:]
    np.testing.assert_array_equal(open_sample(path).expression.X, np.asarray(expression.X, dtype=np.float32))


def test_x_of_another_shape_than_obs_and_var_is_refused(tmp_path, expression):
    """X rewritten in place, as anndata writes one array, leaving the sample's consolidated metadata stale: the
    tables are read by their own metadata (by the stale copy, this X read as 2 rows, its missing one as zeros)."""
    import zarr
    from anndata.io import write_elem

    path = _sample_with(tmp_path, expression=expression)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    write_elem(root["tables/anucleus"], "X", np.asarray(expression.X)[:1])  # one row for two cells
    with pytest.raises(DataError, match=r"anucleus.*X has shape \(1, 460\), but obs and var give \(2, 460\)"):
        open_sample(path)


def test_genes_in_another_order_are_refused_before_any_embedding(tmp_path, expression):
    _sample_with(tmp_path, "a", expression)
    order = np.r_[1, 0, 2:460]
    swapped = _sample_with(tmp_path, "b", expression[:, order].copy())
    with pytest.raises(DataError) as info:
        open_samples(tmp_path / "data")
    assert str(swapped) in str(info.value) and "another order" in str(info.value)
    result = _run_cli("embed", "--data", str(tmp_path / "data"), "--cache", str(tmp_path / "c.zarr"),
                      "--device", "cpu")
    assert result.returncode == 2 and "another order" in result.stderr
    assert not (tmp_path / "c.zarr" / "a").exists()  # refused before embedding anything


def test_a_data_set_without_training_nuclei_is_refused(tmp_path):
    tissue = simulate_tissue(60, seed=5)
    ids = tissue["cell_ids"]
    measured = tissue["counts"].sum(1) > 0
    expression = expression_table(ids[measured], tissue["counts"][measured], tissue["y"][measured],
                                  tissue["x"][measured])
    data = tmp_path / "data"
    write_sample(data / "alone.zarr", tissue["image"], tissue["mask"],
                 pd.DataFrame({"cell_id": ids, "group": "test"}), expression, chunk_size=128)
    cache = str(tmp_path / "c.zarr")
    assert _run_cli("embed", "--data", str(data), "--cache", cache, "--patch-sizes", "24",
                    "--device", "cpu").returncode == 0
    result = _run_cli("regress", "--data", str(data), "--cache", cache, "--model-dir", str(tmp_path / "m"),
                      "--patch-sizes", "24", "--models", "mean-profile", "ridge")
    assert result.returncode == 2, result.stderr
    assert "error: " in result.stderr and "no training nuclei" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_mask_chunk_under_the_corner_of_a_round_nucleus_box_is_not_damage(tmp_path):
    """zarr omits all-background chunks; a disc's bounding box reaching one is no sign of a partial copy."""
    import pandas as pd

    from slidedata.writer import write_sample

    yy, xx = np.mgrid[:64, :64]
    mask = (((yy - 22) ** 2 + (xx - 22) ** 2) <= 11 ** 2).astype(np.uint32)  # box 11..33 reaches chunk (2, 2)
    image = np.full((3, 64, 64), 200, np.uint8)
    path = write_sample(tmp_path / "disc.zarr", image, mask, pd.DataFrame({"cell_id": [1], "group": ["train"]}),
                        chunk_size=16)
    assert not (path / "images" / "HE_nuc_original" / "s0" / "c" / "0" / "2" / "2").exists()
    assert (path / "images" / "HE_nuc_original" / "s0" / "c" / "0" / "1" / "1").exists()
    sample = open_sample(path)
    assert sample.nuclei()["cell_id"].tolist() == [1]
