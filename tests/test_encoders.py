"""Encoders load through the real path (local hub-layout weights -> the same loader the hub download feeds)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from embed.encoders import EncoderLoadError, _build_timm, load_encoder
from embed.registry import ENCODERS, EncoderSpec, get_spec

TINY_VIT = EncoderSpec(
    name="tiny-vit", library="timm", dim=32, input_size=32, architecture="vit_tiny_patch16_224",
    timm_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0,
                 "init_values": 1e-5},
)
RESNET = replace(get_spec("resnet50"), name="resnet18", architecture="resnet18", dim=512, input_size=64)


def _save_hub_layout(model, folder, architecture, safetensors=True):
    """What a hub repository holds: config.json and the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": architecture}))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _patches(size, n=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, 3, size, size), dtype=np.uint8))


def _fresh(spec, seed):
    torch.manual_seed(seed)
    return _build_timm(spec).eval()


@pytest.mark.parametrize("spec, safetensors", [(TINY_VIT, True), (RESNET, False)], ids=["vit", "cnn"])
def test_local_weights_are_applied(tmp_path, spec, safetensors):
    reference = _fresh(spec, seed=1)
    if spec is RESNET:  # a hub checkpoint keeps its 1000-class head; the encoder drops only that
        with_head = timm.create_model("resnet18", num_classes=1000)
        with_head.load_state_dict(reference.state_dict(), strict=False)
        folder = _save_hub_layout(with_head, tmp_path / "hub", "resnet18", safetensors)
    else:
        folder = _save_hub_layout(reference, tmp_path / "hub", spec.architecture, safetensors)

    encoder = load_encoder(spec, weights=folder)
    patches = _patches(48)
    with torch.inference_mode():
        out = encoder(patches)
        expected = reference(encoder.preprocess(patches))
        other = _fresh(spec, seed=2)(encoder.preprocess(patches))
    assert out.shape == (3, spec.dim)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, other)  # the weights were applied, not a fresh init
    assert len(encoder.weights_sha256) == 64
    assert not any(p.requires_grad for p in encoder.parameters())


def test_class_and_mean_token_pooling(tmp_path):
    spec = replace(TINY_VIT, name="tiny-virchow", dim=64, pooling="cls_mean",
                   timm_kwargs={**TINY_VIT.timm_kwargs, "reg_tokens": 2, "global_pool": ""})
    reference = _fresh(spec, seed=3)
    encoder = load_encoder(spec, weights=_save_hub_layout(reference, tmp_path / "hub", spec.architecture))
    patches = _patches(32)
    with torch.inference_mode():
        tokens = reference.forward_features(encoder.preprocess(patches))
        expected = torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=1)  # class + 2 registers are prefixes
        torch.testing.assert_close(encoder(patches), expected)


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    folder = _save_hub_layout(_fresh(TINY_VIT, 0), tmp_path / "hub", TINY_VIT.architecture)
    wider = replace(TINY_VIT, dim=48, timm_kwargs={**TINY_VIT.timm_kwargs, "embed_dim": 48})
    with pytest.raises(EncoderLoadError, match="wrong shape"):
        load_encoder(wider, weights=folder)


def test_missing_weights_path(tmp_path):
    with pytest.raises(EncoderLoadError, match="no such weights"):
        load_encoder(TINY_VIT, weights=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="no weights file in this folder"):
        load_encoder(TINY_VIT, weights=tmp_path / "empty")


@pytest.mark.slow
def test_gated_model_without_token_says_what_to_do(monkeypatch):
    """... before building the network (ViT-L: seconds of random initialisation for an error)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("embed.encoders._build_timm",
                        lambda spec: pytest.fail("the network was built before its weights were found"))
    with pytest.raises(EncoderLoadError, match="HF_TOKEN.*--weights"):
        load_encoder("uni")


def test_unknown_and_unsupported_encoders():
    with pytest.raises(KeyError, match="known encoders: .*uni"):
        get_spec("not-a-model")
    with pytest.raises(EncoderLoadError, match="conch"):
        load_encoder("conch")


@pytest.mark.parametrize("name", [n for n, s in ENCODERS.items() if s.library == "timm"])
def test_registry_entries_build_with_the_declared_dimension(name):
    """Every timm entry builds (on the meta device: no memory, no weights) and outputs its declared dim."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = _build_timm(spec)
        x = torch.zeros(1, 3, spec.input_size, spec.input_size)
        if spec.pooling == "cls_mean":
            tokens = model.forward_features(x)
            out = torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)
        else:
            out = model(x)
    assert out.shape == (1, spec.dim)


def test_handcrafted_features_see_the_nucleus():
    encoder = load_encoder("handcrafted")
    patches = torch.full((2, 3, 32, 32), 235, dtype=torch.uint8)
    masks = torch.zeros((2, 2, 32, 32), dtype=torch.bool)
    masks[0, :, 12:20, 12:20] = True  # 64 px nucleus
    masks[1, :, 10:22, 8:24] = True  # 12 x 16 = 192 px nucleus
    patches[:, :, masks[0, 0] | masks[1, 0]] = torch.tensor([80, 40, 140], dtype=torch.uint8)[:, None]
    features = encoder(patches, masks)
    names = __import__("embed.handcrafted", fromlist=["FEATURE_NAMES"]).FEATURE_NAMES
    area = features[:, names.index("nucleus_area")]
    torch.testing.assert_close(area, torch.tensor([64.0, 192.0]), rtol=0.02, atol=1.0)
    haem = features[:, names.index("nucleus_haem_mean")]
    assert (haem > features[:, names.index("background_haem_mean")] + 0.3).all()


# -- preprocessing and handcrafted features against numbers computed by hand ---------------------------------------

def test_preprocessing_normalises_with_the_spec_mean_and_std():
    spec = replace(TINY_VIT, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    encoder = _preprocessor(spec)
    patches = torch.empty((1, 3, 32, 32), dtype=torch.uint8)
    patches[0, 0], patches[0, 1], patches[0, 2] = 51, 102, 153  # 0.2, 0.4, 0.6 after / 255
    out = encoder.preprocess(patches)
    # (0.2 - 0.5) / 0.25 = -1.2, (0.4 - 0.4) / 0.2 = 0, (0.6 - 0.3) / 0.1 = 3
    expected = torch.tensor([-1.2, 0.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_preprocessing_resizes_bilinearly_with_half_pixel_centres_and_antialias():
    spec = replace(TINY_VIT, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=4)
    encoder = _preprocessor(spec)
    # Up: a 2-px row [0, 1] sampled at x = -0.25, 0.25, 0.75, 1.25 (clamped) -> [0, 0.25, 0.75, 1].
    up = torch.tensor([[0, 255], [0, 255]], dtype=torch.uint8).expand(1, 3, 2, 2)
    torch.testing.assert_close(encoder.preprocess(up)[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # Down with antialias: an 8-px row [0,0,0,0,1,1,1,1] -> 4 px, outputs centred at 1, 3, 5, 7, triangle filter
    # w(d) = 1 - |d| / 2. The output at 3 weighs the inputs at 1.5, 2.5, 3.5, 4.5 by 0.25, 0.75, 0.75, 0.25 and only
    # 4.5 is 1: 0.25 / 2 = 0.125 (symmetrically 0.875 at 5); the one at 1 sees only zeros.
    down = torch.tensor([[0, 0, 0, 0, 255, 255, 255, 255]] * 8, dtype=torch.uint8).expand(1, 3, 8, 8)
    torch.testing.assert_close(encoder.preprocess(down)[0, 0, 0], torch.tensor([0.0, 0.125, 0.875, 1.0]),
                               rtol=0, atol=1e-6)


def _preprocessor(spec):
    from embed.encoders import PatchEncoder

    return PatchEncoder(spec, torch.nn.Identity(), weights_sha256="none")


def test_handcrafted_features_match_hand_computed_numbers():
    """A 64 px patch (the encoder's input size: no resize), background (230, 200, 220), an 8 x 8 px nucleus of
    (80, 40, 140) at rows/columns 28:36 that is also the only nucleus in the 'any nucleus' mask."""
    from embed.handcrafted import FEATURE_NAMES

    background, nucleus = np.array([230, 200, 220]), np.array([80, 40, 140])
    patches = torch.from_numpy(np.broadcast_to(background[None, :, None, None], (1, 3, 64, 64)).astype(np.uint8).copy())
    patches[0, :, 28:36, 28:36] = torch.from_numpy(nucleus.astype(np.uint8))[:, None, None]
    masks = torch.zeros((1, 2, 64, 64), dtype=torch.bool)
    masks[0, :, 28:36, 28:36] = True
    features = dict(zip(FEATURE_NAMES, load_encoder("handcrafted")(patches, masks)[0].tolist()))

    fraction = 64 / 4096
    mean_rgb = (fraction * nucleus + (1 - fraction) * background) / 255
    assert [features[k] for k in ("r_mean", "g_mean", "b_mean")] == pytest.approx(mean_rgb.tolist(), abs=1e-5)
    assert [features[k] for k in ("nucleus_r", "nucleus_g", "nucleus_b")] == pytest.approx((nucleus / 255).tolist(),
                                                                                           abs=1e-5)
    assert features["nucleus_fraction"] == pytest.approx(fraction) and features["any_nucleus_fraction"] == pytest.approx(fraction)
    assert features["nucleus_area"] == pytest.approx(64.0)
    # An 8 px side has the variance of 0..7, (8^2 - 1) / 12 = 5.25, along both axes: axes 4 * sqrt(5.25), round.
    assert features["nucleus_major_axis"] == pytest.approx(4 * np.sqrt(5.25), abs=1e-4)
    assert features["nucleus_minor_axis"] == pytest.approx(4 * np.sqrt(5.25), abs=1e-4)
    assert features["nucleus_eccentricity"] == pytest.approx(0.0, abs=1e-3)
    # Haematoxylin density by Ruifrok & Johnston's colour deconvolution, written out here independently.
    h, e = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    residual = np.cross(h, e) / np.linalg.norm(np.cross(h, e))
    to_stains = np.linalg.inv(np.stack([h, e, residual]))
    haem = lambda rgb: float((-np.log(rgb / 255) @ to_stains)[0])  # noqa: E731
    assert features["nucleus_haem_mean"] == pytest.approx(haem(nucleus), abs=1e-4)
    assert features["background_haem_mean"] == pytest.approx(haem(background), abs=1e-4)
    assert features["nucleus_haem_std"] == pytest.approx(0.0, abs=1e-4)
    assert features["haem_mean"] == pytest.approx(fraction * haem(nucleus) + (1 - fraction) * haem(background),
                                                  abs=1e-4)
