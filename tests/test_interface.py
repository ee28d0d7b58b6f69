"""The challenge's train / infer interface, on the small fixture, through the same library code as the Makefile."""

import numpy as np
import pandas as pd
import pytest

from slidedata import open_sample

pytestmark = pytest.mark.slow  # train and infer end to end, each embedding the demo samples


def test_train_then_infer_is_deterministic(small_demo_dir, tmp_path):
    from submission.main import infer, train

    model_dir = tmp_path / "model"
    train(str(small_demo_dir), str(model_dir), models=("mean-profile", "ridge"), patch_sizes=(24,))  # one small size
    assert (model_dir / "predictor.joblib").exists()

    first = infer(str(small_demo_dir / "demo0.zarr"), str(model_dir))
    second = infer(str(small_demo_dir / "demo0.zarr"), str(model_dir))
    pd.testing.assert_frame_equal(first, second)  # the runner may call twice and compare
    assert list(first.columns) == ["cell_id", "gene", "prediction"]
    groups = open_sample(small_demo_dir / "demo0.zarr").groups
    held_out = groups.index[groups.isin(["validation", "test"])]
    assert len(first) == len(held_out) * 460 and set(first["cell_id"]) == set(held_out)
    assert (first["prediction"] >= 0).all() and np.isfinite(first["prediction"]).all()


def test_neural_encoder_weights_travel_with_the_model(small_demo_dir, tmp_path, monkeypatch):
    """train copies the weights into the model folder; infer loads them from there (the runner is offline)."""
    from embed.registry import ENCODERS
    from submission.main import infer, train
    from tests.test_encoders import TINY_VIT, _fresh, _save_hub_layout

    monkeypatch.setitem(ENCODERS, TINY_VIT.name, TINY_VIT)
    weights = _save_hub_layout(_fresh(TINY_VIT, seed=5), tmp_path / "hub", TINY_VIT.architecture)
    model_dir = tmp_path / "model"
    train(str(small_demo_dir), str(model_dir), encoder=TINY_VIT.name, weights=str(weights), models=("ridge",),
          patch_sizes=(48,), figures=False)
    assert (model_dir / "encoder" / "model.safetensors").exists()

    import shutil

    shutil.rmtree(weights)  # the original weights are gone, as on the runner's machine
    predictions = infer(str(small_demo_dir / "demo1.zarr"), str(model_dir))
    groups = open_sample(small_demo_dir / "demo1.zarr").groups
    assert len(predictions) == groups.isin(["validation", "test"]).sum() * 460


def test_infer_embeds_every_feature_block_the_model_reads(small_demo_dir, tmp_path):
    """A model on handcrafted features plus an EfficientNet block (resampled to 32 px) predicts through infer what
    the saved estimator predicts from the training cache: infer embeds the extra encoder too, with the recorded input
    size, and labels every row with its own nucleus. The expected values come from the fit's own reading of the
    cache (`CacheSource`, the engine's path), not from `predict_held_out`, which infer calls."""
    from embed.pipeline import EmbedSettings, embed_dataset
    from regress.features import FeatureSpec
    from regress.fit import fit_and_evaluate
    from regress.settings import FitSettings
    from regress.source import CacheSource
    from submission.main import infer

    cache, model_dir = tmp_path / "features.zarr", tmp_path / "model"
    embed_dataset(small_demo_dir, cache, "handcrafted", settings=EmbedSettings(patch_sizes=(24,), chunk_nuclei=128),
                  device="cpu", progress=False)
    embed_dataset(small_demo_dir, cache, "efficientnet-lite0", device="cpu", progress=False,
                  settings=EmbedSettings(patch_sizes=(48,), chunk_nuclei=128, input_size=32))
    spec = FeatureSpec(encoder="handcrafted", patch_sizes=(24,), extra_keys=(("efficientnet-lite0", 48),))
    _, predictor = fit_and_evaluate(small_demo_dir, cache, model_dir, FitSettings(features=spec, models=("ridge",),
                                                                                     figures=False),
                                    progress=False)
    source = CacheSource.open(small_demo_dir, cache, predictor.feature_spec, reducer=predictor.reducer, progress=False)
    matrix = source.matrix(next(s for s in source.samples if s.name == "demo2"))
    held = np.isin(matrix.group, ["validation", "test"])
    assert held.sum() > 10
    expected = np.round(predictor.estimator.predict(matrix.X[held]).astype(np.float64), 2)
    frame = infer(str(small_demo_dir / "demo2.zarr"), str(model_dir))
    groups = open_sample(small_demo_dir / "demo2.zarr").groups
    assert set(frame["cell_id"]) == set(groups.index[groups.isin(["validation", "test"])])
    wide = frame.pivot(index="cell_id", columns="gene", values="prediction").loc[matrix.cell_id[held],
                                                                                 predictor.genes]
    np.testing.assert_allclose(wide.to_numpy(), expected, atol=1e-6)


def test_train_with_no_features_named_takes_the_default_features_and_infer_serves_them(small_demo_dir, tmp_path):
    """As `make embed fit`: the demo samples store their pixel size (0.2125 um/px), so train embeds and fits the
    micron recipe (docs/fit.md: handcrafted at 12, 24, 48 um, EfficientNet-Lite0 at 48 um, neighbours within 50 um),
    and infer embeds a new sample's blocks at the same sizes."""
    from regress.model_dir import ModelDir
    from submission.main import infer, train

    model_dir = tmp_path / "model"
    train(str(small_demo_dir), str(model_dir), models=("ridge+context",), figures=False)
    spec = ModelDir(model_dir).load_predictor().feature_spec
    assert [(e, s.key) for e, s in spec.keys] == [("handcrafted", "12um"), ("handcrafted", "24um"),
                                                  ("handcrafted", "48um"), ("efficientnet-lite0", "48um")]
    assert spec.context_radius == pytest.approx((50 / 0.2125,))
    assert not (model_dir / "encoder").exists()  # the recipe's weights come with their packages
    assert not list(model_dir.glob("*.png")) and (model_dir / "scores.csv").is_file()  # figures=False reached the fit
    frame = infer(str(small_demo_dir / "demo2.zarr"), str(model_dir))
    groups = open_sample(small_demo_dir / "demo2.zarr").groups
    assert set(frame["cell_id"]) == set(groups.index[groups.isin(["validation", "test"])])
    assert len(frame) == groups.isin(["validation", "test"]).sum() * 460 and (frame["prediction"] >= 0).all()
