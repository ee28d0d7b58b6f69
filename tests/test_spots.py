"""Spot-data importer: readers (her2st folder, h5ad + image), gene panel, defective spots, both cell modes, bad input.

Fixtures are written in the real formats: a her2st-like folder (HE.jpg, counts.tsv.gz, spots.tsv) and an h5ad with
obsm['spatial'] in full-resolution (x, y) pixels beside a PNG or TIFF. The synthetic H&E is pink background with
dark-blue discs ("nuclei") at known places inside the spots.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from importers.spot_nuclei import segment_spot_nuclei
from importers.spot_readers import read_h5ad_section, read_her2st_section
from importers.spots import choose_gene_panel, import_sections, import_sections_report, main, read_spot_ids
from slidedata.errors import DataError
from slidedata.sample import open_samples

PITCH_PX = 200  # 200 um pitch at 1 um/px: the her2st reader must find 1.0 um/px
RADIUS_PX = 50  # 100 um spots
BACKGROUND = (236, 196, 220)  # eosin pink
NUCLEUS = (60, 50, 130)  # haematoxylin blue
# Array positions (x, y) of the 2 x 2 grid; pixel centre = (PITCH * x - 100, PITCH * y - 100) as (column, row).
ARRAY = [(1, 1), (2, 1), (1, 2), (2, 2)]
GENES = ["A", "B", "C", "D", "E"]
COUNTS = np.array([[30, 10, 5, 0, 1],
                   [2, 40, 8, 3, 0],
                   [1, 1, 0, 0, 0],  # total 2: a defective spot
                   [12, 12, 30, 6, 4]])
NUCLEUS_OFFSETS = [(0, 0), (0, 22), (22, 0), (-22, 0), (0, -22), (-18, -18)]  # (dy, dx) from the spot centre


def _spot_centres_px(array=ARRAY) -> np.ndarray:
    """(y, x) pixel centres of the array positions."""
    return np.array([(PITCH_PX * y - 100, PITCH_PX * x - 100) for x, y in array], dtype=float)


def _he_image(shape, centres, n_nuclei_per_spot, radius=5, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((*shape, 3), dtype=np.float64)
    image[:] = BACKGROUND
    for (cy, cx), n in zip(centres, n_nuclei_per_spot):
        for dy, dx in NUCLEUS_OFFSETS[:n]:
            # each disc drawn in its own bounding box: a whole-image mask per disc took most of a grid section's time
            top, left = max(int(np.floor(cy + dy - radius)), 0), max(int(np.floor(cx + dx - radius)), 0)
            bottom = max(min(int(np.ceil(cy + dy + radius)) + 1, shape[0]), top)
            right = max(min(int(np.ceil(cx + dx + radius)) + 1, shape[1]), left)
            yy, xx = np.mgrid[top:bottom, left:right]
            image[top:bottom, left:right][(yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= radius ** 2] = NUCLEUS
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_her2st_folder(folder: Path, counts=COUNTS, genes=GENES, array=ARRAY, extra_spot=True,
                        n_nuclei=(3, 5, 2, 6), image_shape=(400, 400)) -> Path:
    """A section in her2st's layout; spots.tsv lists one more position than the count table (as the real files)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    centres = _spot_centres_px(array)
    Image.fromarray(_he_image(image_shape, centres, n_nuclei)).save(folder / "HE.jpg", quality=95)
    names = [f"{x}x{y}" for x, y in array]
    pd.DataFrame(counts, index=names, columns=genes).to_csv(folder / "counts.tsv.gz", sep="\t")
    rows = [(x, y, x, y, cx, cy, 1) for (x, y), (cy, cx) in zip(array, centres)]
    if extra_spot:
        rows.append((9, 9, 9, 9, 350.0, 350.0, 1))
    pd.DataFrame(rows, columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]).to_csv(
        folder / "spots.tsv", sep="\t", index=False)
    return folder


@pytest.fixture
def her2st(tmp_path) -> Path:
    return write_her2st_folder(tmp_path / "her2st" / "S1")


def _expected_x(counts: np.ndarray) -> np.ndarray:
    """Reference: log1p(count / total * 100) row by row, written out by hand."""
    out = np.zeros(counts.shape)
    for i, row in enumerate(counts):
        total = sum(row)
        for j, c in enumerate(row):
            out[i, j] = np.log(1 + c / total * 100)
    return out


# -------------------------------------------------------------------------------------------------- readers

def test_her2st_reader_positions_pixel_size_and_counts(her2st):
    section = read_her2st_section(her2st)
    assert section.spot_ids == ["1x1", "2x1", "1x2", "2x2"]  # the extra spot without counts is ignored
    # pixel_x is the column: array (2, 1) sits at column 300, row 100.
    np.testing.assert_allclose(section.centres_px[1], [100, 300])
    assert section.microns_per_pixel == pytest.approx(1.0, rel=1e-6)
    assert section.spot_radius_px == pytest.approx(RADIUS_PX)
    np.testing.assert_array_equal(section.counts, COUNTS)
    assert section.load_image().shape == (400, 400, 3)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_h5ad_reader_xy_order_scalefactors_and_counts_layer(tmp_path, suffix):
    import anndata as ad
    import tifffile
    from PIL import Image

    centres = _spot_centres_px()
    image = _he_image((400, 400), centres, (1, 1, 1, 1))
    image_path = tmp_path / f"he{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(image_path, image)
    else:
        Image.fromarray(image).save(image_path)
    table = ad.AnnData(X=np.zeros(COUNTS.shape, dtype=np.float32),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(4)]), var=pd.DataFrame(index=GENES))
    table.layers["counts"] = COUNTS.astype(np.float32)  # integer-valued floats, as h5ad files often hold
    table.obsm["spatial"] = centres[:, ::-1]  # (x, y)
    table.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 2 * RADIUS_PX}}}
    table.write_h5ad(tmp_path / "s.h5ad")

    section = read_h5ad_section(tmp_path / "s.h5ad", image_path, spot_diameter_um=55.0)
    np.testing.assert_allclose(section.centres_px, centres)
    assert section.microns_per_pixel == pytest.approx(55.0 / 100)
    assert section.spot_radius_px == pytest.approx(RADIUS_PX)
    np.testing.assert_array_equal(section.counts, COUNTS)
    np.testing.assert_array_equal(section.load_image(), image)

    paths = import_sections([section], tmp_path / "out", cells="spot", min_counts=0)
    (sample,) = open_samples(paths[0], n_genes=None)
    assert sample.microns_per_pixel == pytest.approx(0.55)
    assert sample.genes == ["B", "A", "C", "D", "E"]
    np.testing.assert_allclose(sample.expression.X, _expected_x(COUNTS[:, [1, 0, 2, 3, 4]]), rtol=1e-6)


def test_h5ad_given_pixel_size_must_agree_with_the_stored_one(tmp_path):
    import anndata as ad
    from PIL import Image

    table = ad.AnnData(X=COUNTS.astype(np.float32), var=pd.DataFrame(index=GENES))
    table.obsm["spatial"] = _spot_centres_px()[:, ::-1]
    table.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 2 * RADIUS_PX,
                                                     "pixel_size_um_embedded": 0.5}}}
    table.write_h5ad(tmp_path / "s.h5ad")
    Image.fromarray(_he_image((400, 400), _spot_centres_px(), (1, 1, 1, 1))).save(tmp_path / "he.png")
    with pytest.raises(DataError, match=r"s\.h5ad.*given pixel size 2 um/px disagrees with the 0\.5 um/px stored"):
        read_h5ad_section(tmp_path / "s.h5ad", tmp_path / "he.png", microns_per_pixel=2.0)
    assert read_h5ad_section(tmp_path / "s.h5ad", tmp_path / "he.png").microns_per_pixel == 0.5
    forced = read_h5ad_section(tmp_path / "s.h5ad", tmp_path / "he.png", microns_per_pixel=2.0,
                               force_microns_per_pixel=True)
    assert forced.microns_per_pixel == 2.0


def test_h5ad_without_pixel_size_is_refused(tmp_path):
    import anndata as ad

    table = ad.AnnData(X=COUNTS.astype(np.float32), var=pd.DataFrame(index=GENES))
    table.obsm["spatial"] = _spot_centres_px()[:, ::-1]
    table.write_h5ad(tmp_path / "bare.h5ad")
    with pytest.raises(DataError, match="bare.h5ad.*microns_per_pixel"):
        read_h5ad_section(tmp_path / "bare.h5ad", tmp_path / "he.png")


# ------------------------------------------------------------------------------------------ panel, min counts

def test_gene_panel_ranks_by_depth_free_fractions(tmp_path):
    # Section S1 is shallow, S2 deep. By summed raw counts S2 alone would choose [C, B, A]; by the mean of each
    # section's mean per-spot fraction the panel is [A, B, C]. E is not in S2, so never chosen.
    one = write_her2st_folder(tmp_path / "S1", counts=np.array([[8, 2, 0, 0, 1], [6, 3, 1, 0, 0],
                                                                [9, 1, 0, 1, 0], [7, 2, 1, 0, 0]]))
    two = write_her2st_folder(tmp_path / "S2", genes=["A", "B", "C", "D", "F"],
                              counts=np.array([[100, 300, 400, 10, 5], [120, 280, 390, 5, 5],
                                               [90, 310, 410, 9, 1], [110, 290, 380, 20, 0]]))
    sections = [read_her2st_section(one), read_her2st_section(two)]
    assert choose_gene_panel(sections, n_genes=3) == ["A", "B", "C"]
    assert choose_gene_panel(sections, n_genes=4) == ["A", "B", "C", "D"]  # common genes only
    with pytest.raises(DataError, match=r"S1/counts\.tsv\.gz.*S2/counts\.tsv\.gz.*panel of 10 genes.*only 4 genes "
                                        "are common"):
        choose_gene_panel(sections, n_genes=10)  # not silently 4
    assert choose_gene_panel(sections, genes=["D", "A"]) == ["D", "A"]  # explicit list kept in its order


def test_min_counts_drops_defective_spots_and_reports_them(her2st, tmp_path):
    (report,) = import_sections_report([read_her2st_section(her2st)], tmp_path / "out", cells="spot")
    assert (report.spots_read, report.spots_dropped, report.spots_kept, report.cells) == (4, 1, 3, 3)
    ids = read_spot_ids(report.path)
    assert sorted(ids) == ["1x1", "2x1", "2x2"]  # 1x2 holds 2 reads

    (kept_all,) = import_sections_report([read_her2st_section(her2st)], tmp_path / "all", cells="spot",
                                         min_counts=1)
    assert kept_all.spots_dropped == 0


# ------------------------------------------------------------------------------------------------- cell modes

def test_spot_mode_discs_expression_groups_and_pixel_size(her2st, tmp_path):
    paths = import_sections([read_her2st_section(her2st)], tmp_path / "out", cells="spot", n_genes=4)
    (sample,) = open_samples(tmp_path / "out", n_genes=None)
    assert paths == [tmp_path / "out" / "S1.zarr"] and sample.name == "S1"
    assert sample.microns_per_pixel == pytest.approx(1.0)
    # Panel: the 4 most expressed by mean fraction; E (1 and 4 counts) is out.
    assert sample.genes == ["B", "A", "C", "D"]
    kept = COUNTS[[0, 1, 3]][:, [1, 0, 2, 3]]
    spot_ids = read_spot_ids(paths[0])
    expression = sample.expression
    np.testing.assert_array_equal(expression.obs["cell_id"], [1, 2, 3])
    assert spot_ids.loc[[1, 2, 3]].tolist() == ["1x1", "2x1", "2x2"]
    np.testing.assert_allclose(expression.X, _expected_x(kept), rtol=1e-6)
    assert set(sample.groups) == {"train"}

    mask = np.asarray(sample.mask)
    areas = np.bincount(mask.ravel())[1:]
    np.testing.assert_allclose(areas, np.pi * RADIUS_PX ** 2, rtol=0.02)
    assert mask[300, 300] == 3 and mask[100, 100] == 1 and mask[300, 100] == 0  # the dropped spot 1x2 is empty
    nuclei = sample.nuclei().set_index("cell_id")
    np.testing.assert_allclose(nuclei.loc[2, ["y", "x"]], [100, 300], atol=0.5)


def test_group_argument(her2st, tmp_path):
    import_sections([read_her2st_section(her2st)], tmp_path / "out", group="test")
    (sample,) = open_samples(tmp_path / "out", n_genes=None)
    assert set(sample.groups) == {"test"}


def test_dark_discs_in_a_spot_are_counted_as_nuclei():
    centre = np.array([[120.0, 120.0]])
    for n in (1, 4, 6):
        image = _he_image((240, 240), centre, (n,), radius=5, seed=n)
        mask, spot_of_cell = segment_spot_nuclei(image, centre, RADIUS_PX, microns_per_pixel=1.0)
        assert abs(len(spot_of_cell) - n) <= 1, n
        assert set(np.unique(mask)) == set(range(len(spot_of_cell) + 1))


def test_nuclei_mode_inherits_spot_counts_and_spot_id(her2st, tmp_path):
    paths = import_sections([read_her2st_section(her2st)], tmp_path / "out", cells="nuclei", min_counts=1)
    (sample,) = open_samples(paths[0], n_genes=None)
    nuclei = sample.nuclei().set_index("cell_id")
    spot_ids = read_spot_ids(paths[0])
    per_spot = spot_ids.value_counts()
    assert per_spot.to_dict() == {"1x1": 3, "2x1": 5, "1x2": 2, "2x2": 6}  # the discs painted in each spot
    centres = dict(zip(["1x1", "2x1", "1x2", "2x2"], _spot_centres_px()))
    x_of_spot = dict(zip(centres, _expected_x(COUNTS[:, [1, 0, 2, 3, 4]])))  # panel order B A C D E
    assert sample.genes == ["B", "A", "C", "D", "E"]
    measured, _ = sample.expression_of(nuclei.index.to_numpy())
    for row, cell_id in enumerate(nuclei.index):
        spot = spot_ids[cell_id]
        assert np.hypot(*(nuclei.loc[cell_id, ["y", "x"]] - centres[spot])) <= RADIUS_PX
        np.testing.assert_allclose(measured[row], x_of_spot[spot], rtol=1e-6)


def test_imported_sample_embeds_with_the_handcrafted_encoder(tmp_path):
    from embed.pipeline import EmbedSettings, embed_dataset

    # The importer's default panel is the challenge's size: a section with 470 genes, the panel takes 460.
    genes = [f"G{i:03d}" for i in range(470)]
    counts = np.random.default_rng(0).poisson(3.0, (len(ARRAY), len(genes)))
    folder = write_her2st_folder(tmp_path / "S1", counts=counts, genes=genes)
    import_sections([read_her2st_section(folder)], tmp_path / "data", cells="nuclei")
    (report,) = embed_dataset(tmp_path / "data", tmp_path / "features.zarr", "handcrafted",
                              settings=EmbedSettings(patch_sizes=(32, 64)), device="cpu", progress=False)
    assert report.nuclei == 16


def test_cli_her2st(her2st, tmp_path, capsys):
    assert main(["her2st", "--src", str(her2st.parent), "--out", str(tmp_path / "out"), "--cells", "spot"]) == 0
    printed = capsys.readouterr().out
    assert "S1: 3 spots kept, 1 dropped (of 4), 3 cells, 5 genes" in printed
    assert (tmp_path / "out" / "S1.zarr").exists()


@pytest.mark.parametrize("n_genes", ["0", "-5"])
def test_cli_refuses_a_panel_of_no_genes(her2st, tmp_path, capsys, n_genes):
    with pytest.raises(SystemExit) as exit_:
        main(["her2st", "--src", str(her2st.parent), "--out", str(tmp_path / "out"), "--n-genes", n_genes])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert exit_.value.code == 2 and len(errors) == 1 and "--n-genes" in errors[0] and n_genes in errors[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_more_genes_than_the_sections_share(her2st, tmp_path, capsys):
    assert main(["her2st", "--src", str(her2st.parent), "--out", str(tmp_path / "out"), "--n-genes", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "20 genes" in err and "only 5 genes" in err
    assert not (tmp_path / "out" / "S1.zarr").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["her2st", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nowhere" in error and error.count("\n") == 1


# ------------------------------------------------------------------------------------------ holding tissue out

GRID = [(x, y) for y in range(1, 7) for x in range(1, 7)]  # 6 x 6 spots, 200 um apart: 1200 x 1200 px at 1 um/px


def write_grid_sections(src: Path, names=("S1", "S2"), n_genes: int = 470, seed: int = 0) -> Path:
    """her2st-like sections of 36 spots with `n_genes` genes (the import keeps 460 by default): a dataset the whole
    pipeline runs on in seconds."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    levels = rng.gamma(1.0, 3.0, n_genes)
    for name in names:
        counts = rng.poisson(levels * rng.gamma(4.0, 0.25, (len(GRID), 1)))
        write_her2st_folder(src / name, counts=counts, genes=genes, array=GRID, n_nuclei=[2] * len(GRID),
                            image_shape=(1200, 1200))
    return src


def test_block_hold_out_is_deterministic_whole_blocks_alternately_test_and_validation():
    from importers.hold_out import HoldOut, assign_spots

    centres = _spot_centres_px(GRID).astype(float) * 0.6875  # um; spots on a pitch sit on block edges
    rule = HoldOut(block_fraction=0.3, block_um=400 * 0.6875)
    first = assign_spots("S1", centres, rule)
    assert np.array_equal(first.group, assign_spots("S1", centres, rule).group)  # deterministic
    held = first.held_out
    assert held.sum() == 8  # 2 x 2 spot blocks: two of them (0.3 x 36 = 10.8; a third would overshoot)
    assert sorted(set(first.group[held])) == ["test", "validation"]
    for region in set(first.region[held]):
        spots = first.region == region
        assert spots.sum() == 4 and len(set(first.group[spots])) == 1  # whole blocks, one group each
        assert np.ptp(centres[spots], axis=0).max() <= 200 * 0.6875 + 1e-6  # adjacent spots, one block
    assert set(first.region[~held]) == {""}
    other_seed = assign_spots("S1", centres, HoldOut(block_fraction=0.3, block_um=400 * 0.6875, seed=1))
    assert not np.array_equal(other_seed.group, first.group)
    whole = assign_spots("S2", centres, HoldOut(sections=("S2",)))
    assert set(whole.group) == {"test"} and set(whole.region) == {"S2"}
    with pytest.raises(DataError, match="one 5000 um block"):
        assign_spots("S1", centres, HoldOut(block_fraction=0.3, block_um=5000))


def test_held_out_nuclei_are_in_the_mask_not_in_anucleus_and_their_truth_is_kept(tmp_path):
    import anndata as ad

    from importers.hold_out import HoldOut

    src = write_grid_sections(tmp_path / "src", names=("S1",), n_genes=8)
    paths = import_sections([read_her2st_section(src / "S1")], tmp_path / "out", cells="nuclei", n_genes=8,
                            hold_out=HoldOut(block_fraction=0.25, block_um=400))
    (sample,) = open_samples(paths[0], n_genes=None)
    spot_of = read_spot_ids(paths[0])
    held = sample.groups[sample.groups != "train"]
    assert len(held) and set(held) <= {"validation", "test"}
    assert set(held.index) <= set(sample.nuclei()["cell_id"])  # in the mask
    measured = set(sample.expression.obs["cell_id"])
    assert not measured & set(held.index) and measured == set(sample.groups.index) - set(held.index)
    for spot in set(spot_of):  # a spot's nuclei share its counts: all held out or none
        assert len(set(sample.groups[spot_of.index[spot_of == spot]])) == 1

    truth = ad.read_h5ad(tmp_path / "out" / "truth" / "S1.h5ad")
    assert sorted(truth.obs["cell_id"]) == sorted(held.index)
    assert (truth.obs.set_index("cell_id")["group"].loc[held.index] == held).all()
    assert list(truth.var_names) == sample.genes
    counts = read_her2st_section(src / "S1")
    spot_counts = pd.DataFrame(counts.counts, index=counts.spot_ids, columns=counts.genes)[sample.genes]
    expected = _expected_x(spot_counts.loc[spot_of.loc[truth.obs["cell_id"]]].to_numpy())
    np.testing.assert_allclose(truth.X, expected, rtol=1e-5)  # each nucleus carries its spot's measurement

    import_sections([read_her2st_section(src / "S1")], tmp_path / "out", cells="nuclei", n_genes=8)
    assert not (tmp_path / "out" / "truth" / "S1.h5ad").exists()  # stale truth of the earlier import is gone


def test_a_held_out_section_is_all_test_without_expression(tmp_path):
    from importers.hold_out import HoldOut

    src = write_grid_sections(tmp_path / "src", n_genes=8)
    reports = import_sections_report([read_her2st_section(src / n) for n in ("S1", "S2")], tmp_path / "out",
                                     n_genes=8, hold_out=HoldOut(sections=("S2",)))
    assert reports[0].held_out == 0 and reports[1].held_out == reports[1].cells > 0
    one, two = open_samples(tmp_path / "out", n_genes=None)
    assert set(one.groups) == {"train"} and one.has_expression
    assert set(two.groups) == {"test"} and not two.has_expression
    assert sorted(p.name for p in (tmp_path / "out" / "truth").iterdir()) == ["S2.h5ad"]


@pytest.mark.slow
def test_round_trip_import_embed_fit_submit_score(tmp_path, capsys):
    """Imported tissue, held out in blocks, goes through every stage's command and is scored by the project's
    own metric: a model's file scores, the truth itself scores 1, a file missing rows is refused."""
    from embed.__main__ import main as embed_main
    from regress.__main__ import main as fit_main
    from submission.__main__ import main as submit_main
    from submission.score import main as score_main, score_submission
    from submission.validate import main as validate_main
    from submission.writer import write_submission
    from submission.predict import SamplePredictions, finalise
    from slidedata.truth import read_truth

    src, data, out = write_grid_sections(tmp_path / "src"), tmp_path / "data", tmp_path / "outputs"
    cache, model, csv = out / "features.zarr", out / "model", out / "submission.csv"
    assert main(["her2st", "--src", str(src), "--out", str(data), "--hold-out-blocks", "0.25",
                 "--hold-out-block-um", "400"]) == 0
    assert "16 cells held out" in capsys.readouterr().out
    assert embed_main(["--data", str(data), "--cache", str(cache), "--patch-sizes", "32", "64"]) == 0
    assert fit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(model), "--patch-sizes", "32",
                     "64", "--models", "mean-profile", "ridge"]) == 0
    assert submit_main(["--data", str(data), "--cache", str(cache), "--model-dir", str(model),
                        "--out", str(csv)]) == 0
    assert "S1: 8 held-out nuclei" in capsys.readouterr().out
    assert validate_main([str(csv), "--data", str(data)]) == 0
    capsys.readouterr()

    assert score_main(["--submission", str(csv), "--truth", str(data / "truth"), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "S1: 8 held-out nuclei in 2 region(s)" in printed and "official cell-wise Spearman" in printed
    report = score_submission(csv, data / "truth", data)
    assert -1 <= report.official <= 1 and report.mean_profile is not None

    truth = read_truth(data / "truth")
    perfect = [SamplePredictions(name, t.obs["cell_id"].to_numpy(np.int64), list(t.var_names), finalise(t.X))
               for name, t in truth.items()]
    write_submission(perfect, tmp_path / "perfect.csv")
    assert score_submission(tmp_path / "perfect.csv", data / "truth").official > 0.99 > report.mean_profile

    frame = pd.read_csv(csv)
    frame.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    assert score_main(["--submission", str(tmp_path / "short.csv"), "--truth", str(data / "truth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "1 of the" in err and "no prediction" in err


# ------------------------------------------------------------------------------------------------- bad input

def test_spot_outside_the_image(tmp_path):
    folder = write_her2st_folder(tmp_path / "S1", array=[(1, 1), (2, 1), (1, 2), (3, 1)])  # column 500 of 400
    with pytest.raises(DataError, match=r"spots\.tsv.*outside the 400 x 400 image.*3x1"):
        read_her2st_section(folder)


def test_count_rows_without_a_spot_position(her2st):
    spots = pd.read_csv(her2st / "spots.tsv", sep="\t")
    spots[spots["x"] != 2].to_csv(her2st / "spots.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"counts\.tsv\.gz.*2 of 4 count rows have no position"):
        read_her2st_section(her2st)


def test_no_common_genes(tmp_path):
    one = read_her2st_section(write_her2st_folder(tmp_path / "S1"))
    two = read_her2st_section(write_her2st_folder(tmp_path / "S2", genes=["V", "W", "X", "Y", "Z"]))
    with pytest.raises(DataError, match=r"S1/counts\.tsv\.gz.*S2/counts\.tsv\.gz.*no gene is common"):
        choose_gene_panel([one, two])


def test_requested_genes_missing(her2st, tmp_path):
    with pytest.raises(DataError, match=r"counts\.tsv\.gz.*absent.*'NOPE'"):
        import_sections([read_her2st_section(her2st)], tmp_path / "out", genes=["A", "NOPE"])


@pytest.mark.parametrize("value, problem", [(2.5, "non-integer"), (-3, "negative")])
def test_counts_must_be_non_negative_integers(tmp_path, value, problem):
    counts = COUNTS.astype(float)
    counts[0, 0] = value
    folder = write_her2st_folder(tmp_path / "S1", counts=counts)
    with pytest.raises(DataError, match=rf"counts\.tsv\.gz.*{problem}"):
        read_her2st_section(folder)


# -------------------------------------------------------------------------------------------------- real data

HER2ST_DIR = Path(os.environ.get("HER2ST_DIR", Path(__file__).resolve().parents[2] / "shared/data/her2st"))


@pytest.mark.slow
@pytest.mark.skipif(not (HER2ST_DIR / "B4").is_dir(), reason=f"real her2st data absent ({HER2ST_DIR})")
def test_real_her2st_b4_spot_mode(tmp_path):
    section = read_her2st_section(HER2ST_DIR / "B4")
    assert section.microns_per_pixel == pytest.approx(0.688, abs=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (report,) = import_sections_report([section], tmp_path, cells="spot")
    # 283 spots with counts; 11x17 and 18x20 hold 1 read each.
    assert (report.spots_read, report.spots_dropped, report.cells, report.genes) == (283, 2, 281, 460)
    (sample,) = open_samples(report.path)
    assert sample.microns_per_pixel == pytest.approx(section.microns_per_pixel)
    assert "11x17" not in set(read_spot_ids(report.path))
