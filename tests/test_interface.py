"""The challenge's train / infer interface, on the fixture, through the same library code as the Makefile."""

import numpy as np
import pandas as pd

from slidedata import open_sample


def test_train_then_infer_is_deterministic(demo_dir, tmp_path):
    from submission.main import infer, train

    model_dir = tmp_path / "model"
    train(str(demo_dir), str(model_dir), models=("mean-profile", "ridge"))
    assert (model_dir / "predictor.joblib").exists()

    first = infer(str(demo_dir / "demo0.zarr"), str(model_dir))
    second = infer(str(demo_dir / "demo0.zarr"), str(model_dir))
    pd.testing.assert_frame_equal(first, second)  # the runner may call twice and compare
    assert list(first.columns) == ["cell_id", "gene", "prediction"]
    groups = open_sample(demo_dir / "demo0.zarr").groups
    held_out = groups.index[groups.isin(["validation", "test"])]
    assert len(first) == len(held_out) * 460 and set(first["cell_id"]) == set(held_out)
    assert (first["prediction"] >= 0).all() and np.isfinite(first["prediction"]).all()


def test_neural_encoder_weights_travel_with_the_model(demo_dir, tmp_path, monkeypatch):
    """train copies the weights into the model folder; infer loads them from there (the runner is offline)."""
    from embed.registry import ENCODERS
    from submission.main import infer, train
    from tests.test_encoders import TINY_VIT, _fresh, _save_hub_layout

    monkeypatch.setitem(ENCODERS, TINY_VIT.name, TINY_VIT)
    weights = _save_hub_layout(_fresh(TINY_VIT, seed=5), tmp_path / "hub", TINY_VIT.architecture)
    model_dir = tmp_path / "model"
    train(str(demo_dir), str(model_dir), encoder=TINY_VIT.name, weights=str(weights), models=("ridge",))
    assert (model_dir / "encoder" / "model.safetensors").exists()

    import shutil

    shutil.rmtree(weights)  # the original weights are gone, as on the runner's machine
    predictions = infer(str(demo_dir / "demo1.zarr"), str(model_dir))
    groups = open_sample(demo_dir / "demo1.zarr").groups
    assert len(predictions) == groups.isin(["validation", "test"]).sum() * 460
