"""The chunk-by-chunk sample writer (synthetic.demo.make_sample): valid samples, whole nuclei across chunk and tile
borders, tables that list exactly the nuclei of the mask, determinism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from slidedata.sample import open_sample
from synthetic import demo
from synthetic.tissue import render_image, render_mask

SHAPE = (1500, 1700)
SEED = 11
CHUNK = 256


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A 1,500 x 1,700 px sample in 256 px chunks, each rendered in 200 px tiles, with one nucleus hidden under an
    earlier one (it must be absent from the mask and from both tables)."""
    real_make_scene = demo.make_scene
    hidden = {}

    def scene_with_a_covered_nucleus(shape, n_nuclei, seed):
        scene = real_make_scene(shape, n_nuclei, seed)
        k = len(scene) // 2
        scene.y[k + 1], scene.x[k + 1] = scene.y[k], scene.x[k]
        scene.a[k + 1], scene.b[k + 1] = 0.5 * scene.b[k], 0.5 * scene.b[k]  # inside nucleus k, drawn after it
        scene.__post_init__()  # the y index must see the moved site
        hidden["id"], hidden["scene"] = int(scene.cell_ids[k + 1]), scene
        return scene

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(demo, "make_scene", scene_with_a_covered_nucleus)
        patch.setattr(demo, "RENDER_TILE", 200)
        path = demo.make_sample(tmp_path_factory.mktemp("large") / "UC9_I.zarr", SEED, *SHAPE, chunk_size=CHUNK)
    return path, hidden


def test_tiled_sample_is_valid_and_lists_exactly_the_nuclei_of_the_mask(written):
    path, hidden = written
    sample = open_sample(path)
    nuclei = sample.nuclei()  # raises if a table names a cell_id absent from the mask
    in_mask = set(nuclei["cell_id"].tolist())
    assert sample.shape == SHAPE and sample.microns_per_pixel == pytest.approx(0.2125)
    assert tuple(sample.image.chunks[1][:2]) == (CHUNK, CHUNK) and tuple(sample.mask.chunks[0][:2]) == (CHUNK, CHUNK)
    assert set(sample.groups.index.tolist()) == in_mask
    assert set(sample.expression.obs["cell_id"].tolist()) <= in_mask
    assert hidden["id"] not in in_mask and len(in_mask) == len(hidden["scene"]) - 1
    # The challenge's density: ~200,000 nuclei on 20,000 x 22,000 px.
    assert abs(len(in_mask) - 200_000 * SHAPE[0] * SHAPE[1] / (20_000 * 22_000)) < 150
    assert set(sample.groups.unique()) == {"train", "validation", "test"}
    measured = sample.expression.obs["cell_id"].to_numpy()
    assert not np.isin(measured, sample.groups.index[sample.groups == "test"]).any()


def test_chunked_render_equals_a_render_in_one_piece(written):
    """Nuclei crossing chunk and tile borders are drawn whole and owned as in one piece; noise and filters agree."""
    path, hidden = written
    sample = open_sample(path)
    scene = hidden["scene"]
    mask, image = np.asarray(sample.mask), np.asarray(sample.image)
    np.testing.assert_array_equal(mask, render_mask(scene, 0, SHAPE[0], 0, SHAPE[1]))
    np.testing.assert_array_equal(image, render_image(scene, 0, SHAPE[0], 0, SHAPE[1]))
    nuclei = sample.nuclei()
    crossing = (nuclei["y_min"] // CHUNK != nuclei["y_max"] // CHUNK) | (nuclei["x_min"] // 200 != nuclei["x_max"] // 200)
    assert crossing.sum() > 50  # the comparison above does cover nuclei cut by borders
    # Whole ellipses: a nucleus drawn alone has about pi * a * b pixels; crossing ones are not cut short.
    alone = ~nuclei["cell_id"].isin(np.unique(_touching_pairs(mask)))
    index = np.searchsorted(scene.cell_ids, nuclei["cell_id"].to_numpy())
    expected = np.pi * scene.a[index] * scene.b[index]
    ratio = (nuclei["area"].to_numpy() / expected)[alone.to_numpy() & crossing.to_numpy()]
    assert len(ratio) > 20 and np.all(np.abs(ratio - 1) < 0.25)


def _touching_pairs(mask: np.ndarray) -> np.ndarray:
    """Ids of nuclei that share an edge with another nucleus (their area is cut by the first-drawn rule)."""
    ids = []
    for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
        touch = (a != b) & (a > 0) & (b > 0)
        ids += [a[touch], b[touch]]
    return np.concatenate(ids)


def test_the_same_seed_writes_the_same_sample_and_another_seed_another(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = [demo.make_sample(tmp_path / f"{i}.zarr", seed, 400, 500, chunk_size=128)
                 for i, seed in enumerate((5, 5, 6))]
    a, b, c = (open_sample(p) for p in paths)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_array_equal(a.expression.X, b.expression.X)
    assert a.groups.equals(b.groups)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
