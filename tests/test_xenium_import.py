"""`he2expr import xenium`: a Xenium output folder the test writes in the vendor's formats, into a sample zarr."""

import numpy as np
import pandas as pd
import pytest

from slidedata.sample import dense, log_normalise, open_sample
from slidedata.truth import read_truth
from submission.cli import main as he2expr
from tests.xenium_folder import GENES, UM, he_with_alignment, write_matrix, write_xenium_folder


def _cell_at(sample, y: float, x: float):
    """The id (as given) of the nucleus covering pixel (y, x)."""
    value = int(np.asarray(sample.mask[int(y), int(x)]))
    return sample.names_of([value])[0] if value else None


@pytest.mark.parametrize("matrix", ["h5", "mtx"])
def test_import_keeps_ids_counts_and_places(tmp_path, matrix, capsys):
    truth = write_xenium_folder(tmp_path / "run", matrix=matrix)
    if matrix == "mtx":  # the older XOA layout: the tables as gzipped CSV too
        for name in ("cells", "nucleus_boundaries"):
            pd.read_parquet(tmp_path / "run" / f"{name}.parquet").to_csv(tmp_path / "run" / f"{name}.csv.gz",
                                                                         index=False)
            (tmp_path / "run" / f"{name}.parquet").unlink()
    status = he2expr(["import", "xenium", "--src", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                      "--hold-out-blocks", "0.3", "--hold-out-block-um", "10"])
    assert status == 0, capsys.readouterr().err
    sample = open_sample(tmp_path / "out" / "run.zarr")  # the stages' defaults read it
    assert sample.microns_per_pixel == pytest.approx(UM) and sample.genes == GENES  # control features left out
    assert [_cell_at(sample, y, x) for y, x in truth.centres_px] == list(truth.ids)
    groups = pd.Series(sample.groups.to_numpy(), index=sample.names_of(sample.groups.index))
    assert set(groups.index) == set(truth.ids) and {"train", "test", "validation"} <= set(groups)

    train = groups.index[groups == "train"]
    rows = pd.Index(truth.ids).get_indexer(train)
    values, measured = sample.expression_of(sample.groups.index[groups.to_numpy() == "train"])
    assert measured.all()
    np.testing.assert_allclose(values, log_normalise(truth.counts[rows].astype(float)), atol=1e-6)

    held = read_truth(tmp_path / "out" / "truth")["run"]
    assert set(held.obs["cell_id"]) == set(groups.index[groups != "train"])
    rows = pd.Index(truth.ids).get_indexer(held.obs["cell_id"])
    np.testing.assert_array_equal(dense(held.layers["counts"]), truth.counts[rows])


def test_an_aligned_he_is_the_image_and_the_nuclei_follow_it(tmp_path):
    from importers.xenium import import_xenium

    truth = write_xenium_folder(tmp_path / "run")
    he, alignment = he_with_alignment(tmp_path / "run", truth, scale=0.5, offset=(6.0, 4.0))
    import_xenium(tmp_path / "run", tmp_path / "out", he_image=he, alignment=alignment)
    sample = open_sample(tmp_path / "out" / "run.zarr")
    assert sample.shape == (int(np.ceil(truth.shape[0] / 0.5)), int(np.ceil(truth.shape[1] / 0.5)))
    assert sample.microns_per_pixel == pytest.approx(UM * 0.5)
    # morphology pixel m -> H&E pixel (m - offset) / scale
    he_centres = (truth.centres_px - np.array([4.0, 6.0])) / 0.5
    assert [_cell_at(sample, y, x) for y, x in he_centres] == list(truth.ids)
    # the image is the H&E's pixels: a nucleus centre is purple there
    y, x = he_centres[0].astype(int)
    assert tuple(np.asarray(sample.image[:, y, x])) == (90, 60, 150)


def _break(folder, how):
    if how == "missing cells":
        (folder / "cells.parquet").unlink()
        return ["--src", str(folder)], "cells.parquet"
    if how == "alignment off the image":
        truth = write_xenium_folder(folder.parent / "other")
        he, alignment = he_with_alignment(folder, truth, offset=(500.0, 400.0))
        return ["--src", str(folder), "--he-image", str(he), "--alignment", str(alignment)], "he_alignment.csv"
    if how == "matrix ids without a nucleus":
        boundaries = pd.read_parquet(folder / "nucleus_boundaries.parquet")
        first = boundaries["cell_id"].iloc[0]
        boundaries[boundaries["cell_id"] != first].to_parquet(folder / "nucleus_boundaries.parquet")
        return ["--src", str(folder)], "nucleus_boundaries.parquet"
    if how == "duplicate genes":
        from tests.xenium_folder import CONTROLS

        (folder / "cell_feature_matrix.h5").unlink()
        names = GENES[:-1] + GENES[:1]
        write_matrix(folder, [f"c{i}" for i in range(3)], names + CONTROLS,
                     ["Gene Expression"] * len(names) + ["Negative Control Probe"] * 2,
                     np.ones((3, len(names) + 2), np.int32))
        return ["--src", str(folder)], "cell_feature_matrix.h5"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing cells", "alignment off the image", "matrix ids without a nucleus",
                                 "duplicate genes"])
def test_bad_folders_are_one_error_line_naming_the_file(tmp_path, how, capsys):
    write_xenium_folder(tmp_path / "run")
    args, culprit = _break(tmp_path / "run", how)
    status = he2expr(["import", "xenium", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and culprit in err[0], err
    assert not (tmp_path / "out" / "run.zarr").exists()


def test_a_cell_with_two_nuclei_has_both(tmp_path):
    """XOA 2 gives each nucleus of a cell its own polygon (label_id): both are the cell's in the mask, and
    nothing between them."""
    from importers.xenium import import_xenium

    truth = write_xenium_folder(tmp_path / "run")
    other = truth.ids[9]  # the next row's second nucleus: diagonal to cell 0
    boundaries = pd.read_parquet(tmp_path / "run" / "nucleus_boundaries.parquet")
    second = boundaries[boundaries["cell_id"] == other].assign(cell_id=truth.ids[0])
    rest = boundaries[boundaries["cell_id"] != other]
    first = rest["cell_id"] == truth.ids[0]
    pd.concat([rest[first], second, rest[~first]]).to_parquet(tmp_path / "run" / "nucleus_boundaries.parquet")
    import_xenium(tmp_path / "run", tmp_path / "out", drop_cells_without_nucleus=True)
    sample = open_sample(tmp_path / "out" / "run.zarr")
    assert _cell_at(sample, *truth.centres_px[0]) == _cell_at(sample, *truth.centres_px[9]) == truth.ids[0]
    # reference: the pixels whose centres either outline holds (shapely), no pixel of a polygon joining them
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    outlines = [Polygon(part[["vertex_x", "vertex_y"]].to_numpy() / UM) for part in (rest[first], second)]
    yy, xx = np.mgrid[: sample.shape[0], : sample.shape[1]]
    expected = shapely.contains_xy(MultiPolygon(outlines), xx + 0.5, yy + 0.5)
    value = int(np.asarray(sample.mask[tuple(truth.centres_px[0].astype(int))]))
    np.testing.assert_array_equal(np.asarray(sample.mask) == value, expected)


def test_cells_without_a_nucleus_can_be_left_out(tmp_path, capsys):
    truth = write_xenium_folder(tmp_path / "run")
    boundaries = pd.read_parquet(tmp_path / "run" / "nucleus_boundaries.parquet")
    boundaries[boundaries["cell_id"] != truth.ids[0]].to_parquet(tmp_path / "run" / "nucleus_boundaries.parquet")
    assert he2expr(["import", "xenium", "--src", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                    "--drop-cells-without-nucleus"]) == 0
    assert "47 cells" in capsys.readouterr().out
    sample = open_sample(tmp_path / "out" / "run.zarr")
    assert set(sample.names_of(sample.groups.index)) == set(truth.ids[1:])


def test_import_dispatches_xenium_and_spots_as_before(capsys):
    with pytest.raises(SystemExit) as exit_:
        he2expr(["import", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "he2expr import xenium" in out and "{her2st,h5ad}" in out
    with pytest.raises(SystemExit) as exit_:
        he2expr(["import", "her2st", "--help"])
    assert exit_.value.code == 0 and "--hold-out-sections" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        he2expr(["import", "xenium", "--help"])
    assert exit_.value.code == 0 and "--alignment" in capsys.readouterr().out
