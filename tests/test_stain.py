import numpy as np

from embed.stain import REFERENCE_STAINS, MacenkoNormalizer, estimate_stains


def _stained(stains, seed=0, n=4000):
    rng = np.random.default_rng(seed)
    concentrations = np.c_[rng.gamma(2.0, 0.4, n), rng.gamma(2.0, 0.3, n)]
    od = concentrations @ stains
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def test_macenko_recovers_the_stain_vectors():
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    estimated, _ = estimate_stains(_stained(stains))
    cosine = (estimated * stains).sum(axis=1)
    assert (cosine > 0.98).all(), estimated


def test_normalised_tiles_of_two_stainings_agree():
    a = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    b = np.array([[0.45, 0.80, 0.40], [0.20, 0.90, 0.35]])  # another lab's haematoxylin and eosin
    a, b = (m / np.linalg.norm(m, axis=1, keepdims=True) for m in (a, b))
    tile_a, tile_b = _stained(a, seed=1), _stained(b, seed=1)  # same tissue, other stains
    norm_a = MacenkoNormalizer(*estimate_stains(tile_a)).transform(tile_a.T.reshape(3, 40, 100))
    norm_b = MacenkoNormalizer(*estimate_stains(tile_b)).transform(tile_b.T.reshape(3, 40, 100))
    before = np.abs(tile_a.astype(float) - tile_b).mean()
    after = np.abs(norm_a.astype(float) - norm_b).mean()
    assert after < 0.3 * before
    assert REFERENCE_STAINS.shape == (2, 3)


def test_embedding_with_macenko_records_it(demo_dir, tmp_path):
    from embed.encoders import load_encoder
    from embed.pipeline import EmbedSettings, embed_sample
    from slidedata import open_sample
    from slidedata.feature_store import FeatureStore

    store = FeatureStore(tmp_path / "f.zarr")
    settings = EmbedSettings(patch_sizes=(24,), chunk_nuclei=128, stain_normalization="macenko", max_units=1)
    embed_sample(open_sample(demo_dir / "demo1.zarr"), store, load_encoder("handcrafted"), settings, progress=False)
    entry = store.open_entry("demo1", "handcrafted", 24)
    assert entry.attrs["stain_normalization"] == "macenko"
    assert np.isfinite(entry.features[:128]).all()
