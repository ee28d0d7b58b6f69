"""Test-time augmentation (EmbedSettings.tta, --tta): the mean over the 8 dihedral views, invariant to them, and part
of the cache entry's identity."""

import pytest
import torch

import embed.pipeline
from embed.__main__ import main as embed_main
from embed.encoders import load_encoder
from embed.patches import PatchCut, TileReader, unit_patches
from embed.pipeline import EmbedSettings, embed_sample, encode_patches
from slidedata import open_sample
from slidedata.feature_store import CacheMismatchError, FeatureStore

CROP, INPUT = 48, 32  # small crops resampled to a small input (the CNN's 32 px stride: a 1 x 1 map): fast on a CPU
CPU = torch.device("cpu")
ONE_SIZE = dict(patch_sizes=(24,), chunk_nuclei=128)


@pytest.fixture(scope="module")
def crops(demo_dir, tmp_path_factory):
    """Three real crops of demo1 with their masks (this nucleus, any nucleus), as the embed stage cuts them."""
    sample = open_sample(demo_dir / "demo1.zarr")
    nuclei = FeatureStore(tmp_path_factory.mktemp("tta") / "c.zarr").nuclei(sample)
    reader = TileReader(sample, tile_size=256, margin=CROP // 2 + 1, with_mask=True)
    cut = unit_patches(reader, nuclei.iloc[:3], (PatchCut(CROP, CROP),), unit=0)
    return cut.patches[CROP], cut.masks[CROP]


@pytest.fixture(scope="module", params=["efficientnet-lite0", "handcrafted"])
def encoder(request):
    """A CNN, and the handcrafted encoder, which also reads the masks (use_mask): their views must follow the crop's."""
    return load_encoder(request.param)


def _encode(encoder, patches, masks, tta: bool):
    masks = masks if encoder.spec.use_mask else None
    settings = EmbedSettings(batch_size=2, tta=tta)  # 3 crops: two batches
    return torch.from_numpy(encode_patches(encoder, patches, masks, settings, CPU, INPUT, CROP))


def _dihedral_reference(encoder, patches, masks) -> torch.Tensor:
    """The mean of the encoder's features over the 8 transformed batches, written out here with torch's own ops."""
    outputs = []
    with torch.inference_mode():
        for flip in (False, True):
            for k in range(4):
                p, m = (patches.flip(-1), masks.flip(-1)) if flip else (patches, masks)
                p, m = torch.rot90(p, k, dims=(-2, -1)), torch.rot90(m, k, dims=(-2, -1))
                outputs.append(encoder(p, m if encoder.spec.use_mask else None, INPUT, CROP).float())
    return torch.stack(outputs).mean(0)


def test_tta_features_are_the_mean_over_the_8_views(encoder, crops):
    patches, masks = crops
    features = _encode(encoder, patches, masks, tta=True)
    torch.testing.assert_close(features, _dihedral_reference(encoder, patches, masks), atol=1e-5, rtol=1e-5)
    assert (features - _encode(encoder, patches, masks, tta=False)).abs().max() > 1e-4  # TTA did change something


# A quarter turn and a mirror generate the dihedral group: features unchanged by both are unchanged by all 8 views.
@pytest.mark.parametrize("transform", [lambda x: torch.rot90(x, 1, dims=(-2, -1)), lambda x: x.flip(-1)],
                         ids=["quarter-turn", "mirror"])
def test_tta_features_do_not_change_when_the_crop_is_rotated_or_flipped(encoder, crops, transform):
    patches, masks = crops
    features = _encode(encoder, patches, masks, tta=True)
    turned = _encode(encoder, transform(patches).contiguous(), transform(masks).contiguous(), tta=True)
    torch.testing.assert_close(turned, features, atol=1e-5, rtol=1e-5)
    if encoder.spec.library == "timm":  # without TTA a CNN's features do depend on the orientation
        plain = _encode(encoder, patches, masks, tta=False)
        turned_plain = _encode(encoder, transform(patches).contiguous(), transform(masks).contiguous(), tta=False)
        assert (plain - turned_plain).abs().max() > 1e-3


@pytest.mark.parametrize("cached, asked", [(False, True), (True, False)], ids=["plain-then-tta", "tta-then-plain"])
def test_an_entry_is_never_reused_across_tta_settings(demo_dir, tmp_path, cached, asked):
    """Embedding refuses the entry, as for any other setting; so does prediction with a model of the other kind."""
    sample, encoder = open_sample(demo_dir / "demo1.zarr"), load_encoder("handcrafted")
    store = FeatureStore(tmp_path / "features.zarr")
    embed_sample(sample, store, encoder, EmbedSettings(**ONE_SIZE, max_units=1, tta=cached), progress=False)
    made = store.settings("demo1", [("handcrafted", 24)])
    # recorded only when on: entries made without it (by any version) keep their identity
    assert made["handcrafted:24"].get("tta") is (True if cached else None)
    on, off = (r"\['tta=True'\]", r"\[\]") if cached else (r"\[\]", r"\['tta=True'\]")
    with pytest.raises(CacheMismatchError, match=f"only cached: {on}.*only now: {off}.*refusing"):
        embed_sample(sample, store, encoder, EmbedSettings(**ONE_SIZE, max_units=1, tta=asked), progress=False)
    other_model = {key: {**value, "tta": True} if asked else {k: v for k, v in value.items() if k != "tta"}
                   for key, value in made.items()}
    expected, found = (True, None) if asked else (None, True)
    with pytest.raises(CacheMismatchError, match=f"other settings.*tta: expected {expected}, found {found}"):
        store.check_settings("demo1", other_model)


def test_the_cli_flag_reaches_the_settings(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(embed.pipeline, "embed_dataset", lambda *args, **kwargs: seen.append(args[4]) or [])
    for argv, tta in ((["--tta"], True), ([], False)):
        # An encoder named: the default features would open the (here empty) data folder to choose their recipe.
        assert embed_main(["--data", str(tmp_path), "--cache", str(tmp_path / "c.zarr"), "--encoder", "handcrafted",
                           *argv]) == 0
        assert seen.pop().tta is tta


def test_tta_must_be_a_boolean():
    with pytest.raises(ValueError, match="tta must be True or False, got 'yes'"):
        EmbedSettings(tta="yes")
