"""Single cells as they come, through every stage: a Xenium output folder (imported) and a spatialdata-io-style
SpatialData (string ids, its own element names, nuclei as polygons) go through embed, fit, submit (CLI) and the
challenge's train / infer, with the cell ids written as given."""

import pandas as pd
import pytest

from slidedata.sample import open_samples
from submission.cli import main as he2expr
from tests.layouts import rewrite_spatialdata_io_style, string_id

STAGE_ARGS = ["--patch-sizes", "24"]
pytestmark = pytest.mark.slow  # whole stages end to end


@pytest.fixture(autouse=True)
def mask_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HE2EXPR_MASK_CACHE", str(tmp_path / "masks"))


def _xenium_samples(tmp_path):
    from tests.xenium_folder import write_xenium_folder

    truth = write_xenium_folder(tmp_path / "run", n_cells=64)
    assert he2expr(["import", "xenium", "--src", str(tmp_path / "run"), "--out", str(tmp_path / "data"),
                    "--hold-out-blocks", "0.3", "--hold-out-block-um", "10"]) == 0
    return tmp_path / "data", [], set(truth.ids)


def _spatialdata_io_samples(tmp_path, demo_dir):
    elements = rewrite_spatialdata_io_style(demo_dir / "demo2.zarr", tmp_path / "data" / "demo2.zarr", "polygons")
    options = ["--image-element", elements.image, "--nuclei-element", elements.nuclei, "--table-element",
               elements.table, "--groups-element", elements.groups, "--group-column", elements.group_column]
    ids = {string_id(i) for i in open_samples(demo_dir / "demo2.zarr")[0].groups.index}
    return tmp_path / "data", options, ids


@pytest.mark.parametrize("layout", ["xenium folder", "spatialdata-io"])
def test_string_ids_go_through_every_stage(layout, demo_dir, tmp_path):
    from slidedata.cli import elements_from_args
    from submission.main import infer, train
    from submission.validate import expected_held_out

    data, options, all_ids = (_xenium_samples(tmp_path) if layout == "xenium folder"
                              else _spatialdata_io_samples(tmp_path, demo_dir))
    cache, model, out = str(tmp_path / "cache.zarr"), str(tmp_path / "model"), str(tmp_path / "sub.csv")
    assert he2expr(["embed", "--data", str(data), "--cache", cache, *STAGE_ARGS, *options]) == 0
    assert he2expr(["fit", "--data", str(data), "--cache", cache, "--model-dir", model, "--models", "ridge",
                    *STAGE_ARGS, *options]) == 0
    assert he2expr(["submit", "--data", str(data), "--cache", cache, "--model-dir", model, "--out", out,
                    *options]) == 0
    assert he2expr(["validate", out, "--data", str(data), *options]) == 0

    import argparse

    from slidedata.cli import add_sample_arguments

    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    elements = elements_from_args(parser.parse_args(options))
    samples = open_samples(data, elements=elements)
    held = {s.name: set(ids) for s, ids in zip(samples, expected_held_out(samples).values())}
    assert all(isinstance(i, str) for ids in held.values() for i in ids) and set().union(*held.values()) <= all_ids
    written = pd.read_csv(out, dtype={"cell_id": str})
    assert {name: set(rows["cell_id"]) for name, rows in written.groupby("sample")} == \
        {name: ids for name, ids in held.items() if ids}
    parquet = str(tmp_path / "sub.parquet")
    assert he2expr(["submit", "--data", str(data), "--cache", cache, "--model-dir", model, "--out", parquet,
                    *options]) == 0
    assert pd.read_parquet(parquet)["cell_id"].map(type).eq(str).all()
    if (data / "truth").exists():  # the importer's held-out counts, under the same string ids
        assert he2expr(["score", "--submission", out, "--truth", str(data / "truth")]) == 0

    train(str(data), str(tmp_path / "model2"), models=("ridge",), patch_sizes=(24,), elements=elements,
          cache_directory_path=cache, figures=False)
    first = next(s for s in samples if held[s.name])
    predicted = infer(str(first.path), str(tmp_path / "model2"), cache_directory_path=cache, elements=elements)
    assert set(predicted["cell_id"]) == held[first.name]
