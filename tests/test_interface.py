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
