"""Tiles are capped whatever the storage chunks, and the features do not depend on how a slide is chunked."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from embed.encoders import load_encoder
from embed.patches import PatchCut, TileReader, box_sums, unit_patches
from embed.pipeline import EmbedSettings, embed_sample
from slidedata import open_sample
from slidedata.feature_store import FeatureStore
from slidedata.tiles import tile_edge
from slidedata.writer import write_sample


@pytest.mark.parametrize("chunk, cap, edge", [
    (512, 2048, 2048),  # small chunks: whole chunks up to the cap
    (256, 1000, 768),
    (2048, 2048, 2048),
    (20000, 2048, 2000),  # one big chunk: a divisor of it, so tiles never straddle a chunk border
    (22000, 2048, 2000),
    (3000, 2048, 1500),
    (20011, 2048, 2048),  # a prime: no divisor near the cap, the cap itself
])
def test_tile_edge_follows_chunks_within_the_cap(chunk, cap, edge):
    assert tile_edge(chunk, cap) == edge


def _write_copy(source, path, chunk_size: int, size: int = 512):
    """The top-left `size` px of a sample, written again with `chunk_size` px chunks (its group table lists the
    cells left in the cropped mask)."""
    image = np.asarray(source.image[:, :size, :size])
    mask = np.asarray(source.mask[:size, :size])
    present = np.unique(mask[mask > 0])
    groups = pd.DataFrame({"cell_id": present, "group": source.groups.reindex(present).fillna("train").to_numpy()})
    return open_sample(write_sample(path, image, mask, groups, chunk_size=chunk_size))


def test_one_big_chunk_is_read_by_capped_tiles_with_the_same_features(demo_dir, tmp_path):
    source = open_sample(demo_dir / "demo1.zarr")
    whole = _write_copy(source, tmp_path / "whole.zarr", chunk_size=512)  # the image is one chunk
    small = _write_copy(source, tmp_path / "small.zarr", chunk_size=128)
    assert whole.image.chunks[1] == (512,) and small.image.chunks[1] == (128,) * 4
    cap, sizes = 256, (24, 96)  # 96 px is shrunk to the encoder's 64 while cut
    settings = EmbedSettings(patch_sizes=sizes, chunk_nuclei=64, max_tile=cap, num_workers=0)  # reads seen here
    margin = max(sizes) // 2 + 1
    windows = []

    def recording(read):
        def read_window(y0, y1, x0, x1, *args, **kwargs):
            windows.append((y1 - y0, x1 - x0))
            return read(y0, y1, x0, x1, *args, **kwargs)
        return read_window

    whole.read_image, whole.read_mask = recording(whole.read_image), recording(whole.read_mask)
    encoder = load_encoder("handcrafted")
    stores = {name: FeatureStore(tmp_path / f"{name}.features.zarr") for name in ("whole", "small")}
    embed_sample(whole, stores["whole"], encoder, settings, progress=False)
    embed_sample(small, stores["small"], encoder, settings, progress=False)

    assert windows and max(max(w) for w in windows) <= cap + 2 * margin
    image_reads = windows[::2]  # image then mask, per tile: each of the 2 x 2 tiles read once
    assert len(image_reads) == 4
    assert stores["whole"].tile_size("whole") == stores["small"].tile_size("small") == cap
    np.testing.assert_array_equal(stores["whole"].read_nuclei("whole"), stores["small"].read_nuclei("small"))
    for size in sizes:
        np.testing.assert_array_equal(stores["whole"].read_features("whole", "handcrafted", size),
                                      stores["small"].read_features("small", "handcrafted", size))


def test_shrinking_cuts_equal_area_resampling_of_the_whole_crop(demo_dir, tmp_path):
    """A 96 or 224 px crop shrunk while cut = torch's area resampling of the full crop; its masks = torch's nearest
    resampling of the full masks (references: F.interpolate on crops of the padded slide)."""
    sample = open_sample(demo_dir / "demo1.zarr")
    nuclei = FeatureStore(tmp_path / "c.zarr").nuclei(sample)
    rows = nuclei.iloc[:30]
    pad = 224
    image = np.pad(np.asarray(sample.image), ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    mask = np.pad(np.asarray(sample.mask), pad)
    for crop in (96, 224):
        reader = TileReader(sample, tile_size=256, margin=crop // 2 + 1, with_mask=True)
        cut = unit_patches(reader, rows, (PatchCut(crop, 64),), unit=0)
        half = crop // 2
        ys, xs = np.rint(rows.y).astype(int) + pad, np.rint(rows.x).astype(int) + pad
        full = np.stack([image[:, y - half: y - half + crop, x - half: x - half + crop] for y, x in zip(ys, xs)])
        labels = np.stack([mask[y - half: y - half + crop, x - half: x - half + crop] for y, x in zip(ys, xs)])
        expected = F.interpolate(torch.from_numpy(full).float(), size=(64, 64), mode="area")
        torch.testing.assert_close(cut.patches[crop], expected, rtol=0, atol=1e-4)
        own = torch.from_numpy(labels == rows.cell_id.to_numpy()[:, None, None])[:, None].float()
        torch.testing.assert_close(cut.masks[crop][:, :1].float(), F.interpolate(own, size=(64, 64), mode="nearest"))


def test_box_sums_are_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 40, 50), dtype=np.uint8)
    boxes = box_sums(image, 4)
    brute = sum(image[:, i: i + 37, j: j + 47].astype(np.int64) for i in range(4) for j in range(4))
    np.testing.assert_array_equal(boxes, brute.transpose(1, 2, 0))
