"""Patch sizes in pixels or microns, and crops resampled to the encoder's training scale."""

from dataclasses import replace

import numpy as np
import pytest

from embed.encoders import PatchEncoder, load_encoder
from embed.pipeline import EmbedSettings, embed_sample
from embed.registry import get_spec, encoder_input_size
from slidedata import DataError, open_sample
from slidedata.feature_store import CacheMismatchError, FeatureStore
from slidedata.patch_size import PatchSize


@pytest.mark.parametrize("text, key, pixels_at_0_25", [
    (64, "64", 64), ("64px", "64", 64), (1000000, "1000000", 1000000), ("32um", "32um", 128), (" 12.5 µm", "12.5um", 50), ("112um", "112um", 448),
])
def test_patch_sizes_parse_to_canonical_keys_and_slide_pixels(text, key, pixels_at_0_25):
    size = PatchSize.parse(text)
    assert size.key == key
    assert size.pixels(0.25) == pixels_at_0_25


@pytest.mark.parametrize("bad", ["0", "-3", "12.5", "32mm", "big"])
def test_bad_patch_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="patch size"):
        PatchSize.parse(bad)


def test_microns_need_the_pixel_size():
    with pytest.raises(DataError, match="pixel size is unknown"):
        PatchSize.parse("32um").pixels(None, sample="s.zarr")


def test_pathology_encoders_see_tissue_at_their_training_scale():
    uni, resnet = get_spec("uni"), get_spec("resnet50")
    assert encoder_input_size(uni, 527, 0.2125) == 224  # 112 um of a Xenium slide -> 224 px at 0.5 um/px
    assert encoder_input_size(uni, 94, 0.688) == 128  # 64.7 um of a her2st slide -> 129 px, a multiple of 16
    assert encoder_input_size(uni, 527, None) == 224  # unknown scale: fill the input
    assert encoder_input_size(resnet, 40, 0.2125) == 224  # ImageNet models have no scale


def test_a_cache_made_at_one_pixel_size_is_not_reused_at_another(demo_dir, tmp_path):
    store = FeatureStore(tmp_path / "features.zarr")
    encoder = load_encoder("handcrafted")
    stored = open_sample(demo_dir / "demo1.zarr")
    assert stored.microns_per_pixel == pytest.approx(0.2125)
    for sizes in (("8um",), ("24",)):
        settings = EmbedSettings(patch_sizes=sizes, chunk_nuclei=128, max_units=1)
        embed_sample(stored, store, encoder, settings, progress=False)
        entry = store.open_entry("demo1", "handcrafted", sizes[0])
        assert entry.attrs["crop_pixels"] == (38 if sizes[0] == "8um" else 24)  # 8 / 0.2125 = 37.6
        other_scale = open_sample(demo_dir / "demo1.zarr", microns_per_pixel=0.5, force_microns_per_pixel=True)
        with pytest.raises(CacheMismatchError, match="microns_per_pixel|crop_pixels"):
            embed_sample(other_scale, store, encoder, settings, progress=False)


def test_a_given_pixel_size_that_disagrees_with_the_stored_one_is_refused_unless_forced(demo_dir, tmp_path,
                                                                                        capsys):
    from embed.__main__ import main as embed_main
    from submission.main import train

    path = demo_dir / "demo1.zarr"  # stores 0.2125 um/px
    with pytest.raises(DataError, match=r"demo1\.zarr.*given pixel size 5 um/px disagrees with the 0\.2125 um/px "
                                        "stored"):
        open_sample(path, microns_per_pixel=5)
    assert open_sample(path, microns_per_pixel=5, force_microns_per_pixel=True).microns_per_pixel == 5
    assert open_sample(path, microns_per_pixel=0.2126).microns_per_pixel == pytest.approx(0.2126)  # rounding

    cache = tmp_path / "features.zarr"
    assert embed_main(["--data", str(path), "--cache", str(cache), "--microns-per-pixel", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "5 um/px" in err and "0.2125 um/px" in err
    assert not cache.exists()  # refused before anything was embedded
    with pytest.raises(DataError, match="disagrees"):
        train(str(demo_dir), str(tmp_path / "model"), microns_per_pixel=5)


def test_crops_are_resampled_to_the_encoder_scale(demo_dir, tmp_path):
    """A scale-aware encoder gets a crop of 16 um at 0.5 um/px: 32 px, whatever the crop's slide pixels."""
    handcrafted = load_encoder("handcrafted")
    scaled = PatchEncoder(replace(handcrafted.spec, microns_per_pixel=0.5, size_multiple=8), handcrafted.backbone,
                          "none")
    store = FeatureStore(tmp_path / "features.zarr")
    sample = open_sample(demo_dir / "demo1.zarr")
    embed_sample(sample, store, scaled, EmbedSettings(patch_sizes=("16um",), chunk_nuclei=128, max_units=1),
                 progress=False)
    attrs = store.open_entry("demo1", "handcrafted", "16um").attrs
    assert (attrs["crop_pixels"], attrs["input_size"]) == (75, 32)
    assert attrs["encoder_microns_per_pixel"] == 0.5
    patches = np.random.default_rng(0).integers(0, 255, (2, 3, 75, 75), dtype=np.uint8)
    import torch

    assert tuple(scaled.preprocess(torch.from_numpy(patches), 32).shape) == (2, 3, 32, 32)
