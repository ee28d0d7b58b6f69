"""`he2expr export`: cached features as AnnData that scanpy opens, equal to the cache."""

import importlib.util

import numpy as np
import pytest
import zarr

from submission.cli import main as he2expr
from tests.conftest import FIXTURE_PATCH_SIZES


def test_export_matches_the_cache_and_opens_in_anndata(demo_dir, embedded_cache, tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "features"
    assert he2expr(["export", "--cache", str(embedded_cache), "--out", str(out), "--data", str(demo_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["demo0.h5ad", "demo1.h5ad", "demo2.h5ad"]
    table = ad.read_h5ad(out / "demo1.h5ad")
    raw = zarr.open_group(embedded_cache / "demo1", mode="r")  # the cache's own arrays, read without our code
    for size in FIXTURE_PATCH_SIZES:
        stored = raw[f"handcrafted/{size}/features"][:]
        np.testing.assert_array_equal(table.obsm[f"X_handcrafted_{size}"], stored.astype(np.float32))
        np.testing.assert_array_equal(table.obs["cell_id"].to_numpy(np.int64), raw[f"handcrafted/{size}/cell_id"][:])
    np.testing.assert_array_equal(table.obsm["spatial"], np.c_[raw["nuclei/x"][:], raw["nuclei/y"][:]])
    assert set(table.obs["group"]) == {"train", "validation", "test"}
    assert table.uns["microns_per_pixel"] == pytest.approx(0.2125)
    if importlib.util.find_spec("scanpy") is not None:  # what a user does next
        import scanpy as sc

        sc.pp.neighbors(table, use_rep=f"X_handcrafted_{FIXTURE_PATCH_SIZES[0]}", n_neighbors=5)
        assert table.obsp["connectivities"].shape == (table.n_obs, table.n_obs)


def test_export_of_nothing_cached_is_one_error_line(embedded_cache, tmp_path, capsys):
    status = he2expr(["export", "--cache", str(embedded_cache), "--out", str(tmp_path / "f"), "--encoder", "uni"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and "embed" in err[0]
