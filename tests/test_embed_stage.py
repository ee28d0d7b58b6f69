import os
from pathlib import Path

import numpy as np
import pytest

from embed.encoders import load_encoder
from embed.patches import PatchCut, TileReader, cut_patches, unit_patches
from embed.pipeline import EmbedSettings, embed_sample
from slidedata import open_sample
from slidedata.feature_store import CacheMismatchError, FeatureEntry, FeatureStore
from tests.conftest import FIXTURE_PATCH_SIZES, ForkedCommand


def test_cut_patches_are_centred_crops():
    region = np.arange(3 * 20 * 30, dtype=np.int32).reshape(3, 20, 30)
    patches = cut_patches(region, np.array([5, 10]), np.array([7, 20]), 6)
    assert patches.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(patches[0], region[:, 2:8, 4:10])
    np.testing.assert_array_equal(patches[1], region[:, 7:13, 17:23])


def test_unit_patches_match_crops_of_the_padded_slide(demo_dir, tmp_path):
    sample = open_sample(demo_dir / "demo1.zarr")
    nuclei = FeatureStore(tmp_path / "c.zarr").nuclei(sample)
    size = 48
    reader = TileReader(sample, tile_size=256, margin=size // 2 + 1, with_mask=True)
    rows = nuclei.iloc[:40]
    cut = unit_patches(reader, rows, (PatchCut(size, size),), unit=0)
    pad = size
    image = np.pad(np.asarray(sample.image), ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    mask = np.pad(np.asarray(sample.mask), pad)
    for i, (_, row) in enumerate(rows.iterrows()):
        y, x = int(np.rint(row.y)) + pad, int(np.rint(row.x)) + pad
        np.testing.assert_array_equal(cut.patches[size][i].numpy(), image[:, y - 24: y + 24, x - 24: x + 24])
        own = mask[y - 24: y + 24, x - 24: x + 24] == row.cell_id
        np.testing.assert_array_equal(cut.masks[size][i, 0].numpy(), own)
        assert own[24, 24] or own.sum() > 0


def test_nuclei_table_is_cached_in_tile_order(demo_dir, embedded_cache):
    store = FeatureStore(embedded_cache)
    nuclei = store.read_nuclei("demo1")
    tile = store.tile_size("demo1")
    keys = (nuclei.y // tile).astype(int) * 1000 + (nuclei.x // tile).astype(int)
    assert (np.diff(keys.to_numpy()) >= 0).all()
    assert sorted(nuclei.cell_id) == sorted(open_sample(demo_dir / "demo1.zarr").groups.index)


def test_interrupted_embedding_resumes_without_redoing_work(demo_dir, embedded_cache, tmp_path, monkeypatch):
    sample = open_sample(demo_dir / "demo2.zarr")
    store = FeatureStore(tmp_path / "features.zarr")
    encoder = load_encoder("handcrafted")
    settings = EmbedSettings(patch_sizes=FIXTURE_PATCH_SIZES, chunk_nuclei=128, max_units=2)
    first = embed_sample(sample, store, encoder, settings, progress=False)  # "killed" after 2 chunks
    assert first.units_computed == 2 and first.units_total > 2

    written = []
    original = FeatureEntry.write_unit
    monkeypatch.setattr(FeatureEntry, "write_unit", lambda self, u, v: (written.append(u), original(self, u, v)))
    settings.max_units = None
    second = embed_sample(sample, store, encoder, settings, progress=False)
    assert second.units_computed == first.units_total - 2
    assert 0 not in written and 1 not in written  # finished chunks were not recomputed
    for size in FIXTURE_PATCH_SIZES:
        resumed = store.read_features("demo2", "handcrafted", size)
        uninterrupted = FeatureStore(embedded_cache).read_features("demo2", "handcrafted", size)
        np.testing.assert_array_equal(resumed, uninterrupted)
    assert embed_sample(sample, store, encoder, settings, progress=False).units_computed == 0


def test_reading_an_unfinished_entry_fails_clearly(demo_dir, tmp_path):
    sample = open_sample(demo_dir / "demo1.zarr")
    store = FeatureStore(tmp_path / "features.zarr")
    embed_sample(sample, store, load_encoder("handcrafted"),
                 EmbedSettings(patch_sizes=(24,), chunk_nuclei=128, max_units=1), progress=False)
    with pytest.raises(Exception, match="not computed yet.*make embed"):
        store.read_features("demo1", "handcrafted", 24)


def test_other_settings_never_overwrite_an_entry(demo_dir, tmp_path):
    sample = open_sample(demo_dir / "demo1.zarr")
    store = FeatureStore(tmp_path / "features.zarr")
    encoder = load_encoder("handcrafted")
    embed_sample(sample, store, encoder, EmbedSettings(patch_sizes=(24,), chunk_nuclei=128, max_units=1),
                 progress=False)
    with pytest.raises(CacheMismatchError, match="chunk_nuclei"):
        embed_sample(sample, store, encoder, EmbedSettings(patch_sizes=(24,), chunk_nuclei=64), progress=False)
    with pytest.raises(CacheMismatchError, match="pad_mode|stain"):
        store.create_entry("demo1", {**store.open_entry("demo1", "handcrafted", 24).attrs,
                                     "stain_normalization": "macenko"})
    # Another patch size is another entry, next to the first.
    embed_sample(sample, store, encoder, EmbedSettings(patch_sizes=(16,), chunk_nuclei=128), progress=False)
    assert set(store.entries()["patch_size"]) == {"16", "24"}


@pytest.mark.slow
def test_two_processes_fill_disjoint_chunks_of_one_cache(demo_dir, embedded_cache, tmp_path):
    """torchrun-style sharding: RANK / WORLD_SIZE give each rank a contiguous run of the chunks. Rank 1 alone
    leaves exactly rank 0's run pending (the first chunks); both ranks at once each compute their own run, and the
    result equals one process."""
    from embed.__main__ import main as embed_main

    def rank(number: int, cache: Path) -> ForkedCommand:
        argv = ["--data", str(demo_dir / "demo1.zarr"), "--cache", str(cache), "--patch-sizes",
                *map(str, FIXTURE_PATCH_SIZES), "--chunk-nuclei", "128", "--device", "cpu"]
        return ForkedCommand(embed_main, argv, cache.with_suffix(f".rank{number}.log"),
                             {"RANK": str(number), "WORLD_SIZE": "2"})

    code, output = rank(1, tmp_path / "alone.zarr").wait()
    assert code == 0, output
    entry = FeatureStore(tmp_path / "alone.zarr").open_entry("demo1", "handcrafted", 24)
    first_run = entry.pending_units().tolist()
    assert 0 < len(first_run) < entry.n_units and first_run == list(range(len(first_run))), first_run

    cache = tmp_path / "features.zarr"
    codes, outputs = zip(*(r.wait() for r in [rank(0, cache), rank(1, cache)]))
    assert codes == (0, 0), outputs
    computed = [int(o.split("computed ")[1].split(" of")[0]) for o in outputs]
    assert computed == [len(first_run), entry.n_units - len(first_run)], outputs  # each its own run, nothing twice
    for size in FIXTURE_PATCH_SIZES:
        np.testing.assert_array_equal(FeatureStore(cache).read_features("demo1", "handcrafted", size),
                                      FeatureStore(embedded_cache).read_features("demo1", "handcrafted", size))


def test_dataloader_workers_give_the_same_features(demo_dir, embedded_cache, tmp_path, monkeypatch):
    """The default workers, counted from the nuclei the sample's pending chunks hold (about 500 here: two workers
    once each needs 200; counted in chunks, 4, it would be none)."""
    from torch.utils.data import DataLoader

    from embed import pipeline

    started = []
    monkeypatch.setattr(pipeline, "MIN_NUCLEI_PER_WORKER", 200)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(pipeline, "DataLoader", lambda *a, **k: started.append(k["num_workers"]) or DataLoader(*a, **k))
    sample = open_sample(demo_dir / "demo1.zarr")
    store = FeatureStore(tmp_path / "features.zarr")
    embed_sample(sample, store, load_encoder("handcrafted"),
                 EmbedSettings(patch_sizes=FIXTURE_PATCH_SIZES, chunk_nuclei=128), progress=False)
    assert started == [2]
    np.testing.assert_array_equal(store.read_features("demo1", "handcrafted", 48),
                                  FeatureStore(embedded_cache).read_features("demo1", "handcrafted", 48))


def test_default_cpu_workers_need_enough_nuclei_each(monkeypatch):
    """One per core up to 4, but each with at least MIN_NUCLEI_PER_WORKER (1000) nuclei of work, and none rather
    than one; a network on a CPU gets none; a number given is taken as given."""
    import torch

    from embed.pipeline import loader_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    handcrafted, cpu = load_encoder("handcrafted"), torch.device("cpu")
    default = EmbedSettings()
    assert [loader_workers(default, cpu, handcrafted, n) for n in (0, 999, 1999, 2000, 3999, 4000, 10 ** 6)] == \
        [0, 0, 0, 2, 3, 4, 4]
    assert loader_workers(default, cpu, handcrafted) == 4  # work not known: the cores decide
    assert loader_workers(EmbedSettings(num_workers=2), cpu, handcrafted, 10) == 2
    assert loader_workers(EmbedSettings(torch_threads=2), cpu, handcrafted, 10 ** 6) == 0  # two threads: in-process
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert loader_workers(default, cpu, handcrafted, 10 ** 6) == 2


def test_ranks_own_fixed_units_whatever_the_others_have_done(demo_dir, tmp_path, monkeypatch):
    """A rank starting late sees fewer pending units; it must still take only its own share, no more, no less."""
    from embed.patches import contiguous_share

    sample = open_sample(demo_dir / "demo2.zarr")
    store = FeatureStore(tmp_path / "features.zarr")
    encoder = load_encoder("handcrafted")
    settings = EmbedSettings(patch_sizes=(24,), chunk_nuclei=128, rank=0, world_size=2, max_units=2)
    first = embed_sample(sample, store, encoder, settings, progress=False)  # rank 0 is under way

    written = []
    original = FeatureEntry.write_unit
    monkeypatch.setattr(FeatureEntry, "write_unit", lambda self, u, v: (written.append(u), original(self, u, v)))
    settings.rank, settings.max_units = 1, None
    embed_sample(sample, store, encoder, settings, progress=False)
    assert written == contiguous_share(list(range(first.units_total)), 1, 2)
