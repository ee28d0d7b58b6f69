"""The SpatialData path on real Xenium cells (../shared/data/xenium-pancreas, skipped where absent): a window of a
crop, rewritten with Xenium-like string ids and spatialdata-io's element names, predicts exactly as the original,
with the ids written as given."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidedata.sample import dense, open_sample
from slidedata.writer import anucleus_table, write_sample
from tests.layouts import rewrite_spatialdata_io_style, string_id

CROP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xenium-pancreas" / "XP1.zarr"
if not CROP.exists():  # a worktree beside the main checkout
    CROP = Path("/work/shared/data/xenium-pancreas/XP1.zarr")
WINDOW = (2500, 3100, 2500, 3100)  # y0, y1, x0, x1: ~170 cells of XP1


def _window_sample(out: Path) -> Path:
    """The cells wholly inside WINDOW of the crop, the left half for training, the right half held out (test)."""
    import spatialdata as sd

    y0, y1, x0, x1 = WINDOW
    crop = open_sample(CROP)
    mask = np.asarray(crop.mask[y0:y1, x0:x1])
    edge = np.unique(np.r_[mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    mask[np.isin(mask, edge)] = 0  # cells cut by the window leave it
    ids = np.unique(mask[mask > 0]).astype(np.int64)
    ids = ids[np.isin(ids, crop.groups.index)]
    mask[~np.isin(mask, ids)] = 0
    centre_x = pd.Series(np.nonzero(mask)[1], index=mask[mask > 0]).groupby(level=0).mean().reindex(ids).to_numpy()
    group = np.where(centre_x < (x1 - x0) / 2, "train", "test")
    table = sd.read_zarr(CROP).tables["anucleus"]
    rows = pd.Index(table.obs["cell_id"].to_numpy(np.int64)).get_indexer(ids[group == "train"])
    expression = anucleus_table(ids[group == "train"], dense(table.layers["counts"][rows], np.int32), crop.genes,
                                np.asarray(table.obsm["spatial"])[rows])
    return write_sample(out / "XP1w.zarr", np.asarray(crop.image[:, y0:y1, x0:x1]), mask,
                        pd.DataFrame({"cell_id": ids, "group": group}), expression, chunk_size=256,
                        microns_per_pixel=crop.microns_per_pixel)


@pytest.mark.skipif(not CROP.exists(), reason=f"real Xenium crops not here ({CROP})")
def test_a_real_crop_with_string_ids_and_other_names_predicts_as_the_original(tmp_path):
    from submission.main import infer, train

    original = _window_sample(tmp_path / "original")
    elements = rewrite_spatialdata_io_style(original, tmp_path / "rewritten" / "XP1w.zarr", "labels")
    model = tmp_path / "model"
    train(str(original.parent), str(model), models=("ridge",), patch_sizes=(32,))

    expected = infer(str(original), str(model))
    got = infer(str(tmp_path / "rewritten" / "XP1w.zarr"), str(model), elements=elements)
    assert len(expected) > 0 and got["cell_id"].map(type).eq(str).all()
    expected["cell_id"] = [string_id(i) for i in expected["cell_id"]]
    pd.testing.assert_frame_equal(got.sort_values(["cell_id", "gene"]).reset_index(drop=True),
                                  expected.sort_values(["cell_id", "gene"]).reset_index(drop=True),
                                  check_categorical=False)
