"""Small real-format fixtures: demo samples written as SpatialData zarr, embedded once per test session."""

from __future__ import annotations

import warnings

import pytest

FIXTURE_NUCLEI = 500
FIXTURE_PATCH_SIZES = (24, 48)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """Three demo samples (two with expression, one like DC1 without), ~500 nuclei each, 256 px chunks."""
    from synthetic.demo import make_demo_dataset

    folder = tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_demo_dataset(folder, n_nuclei=FIXTURE_NUCLEI, seed=7, chunk_size=256)
    return folder


@pytest.fixture(scope="session")
def embedded_cache(demo_dir, tmp_path_factory):
    """The fixture samples embedded with the handcrafted encoder at two small patch sizes."""
    from embed.pipeline import EmbedSettings, embed_dataset

    cache = tmp_path_factory.mktemp("cache") / "features.zarr"
    embed_dataset(demo_dir, cache, "handcrafted",
                  settings=EmbedSettings(patch_sizes=FIXTURE_PATCH_SIZES, chunk_nuclei=128), device="cpu",
                  progress=False)
    return cache
