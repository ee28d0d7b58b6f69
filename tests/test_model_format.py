"""Saved models carry a format version; models saved before it existed (the fixture: five families saved by the
code of f50d596, `deepsets` among them) load through the one migration step and predict as they did (to float32's
last bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from regress.model_dir import ModelDir
from regress.predictor import FORMAT_VERSION

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "model-v0"
SAVED = {"mean-profile": "MeanProfile", "ridge+context": "RidgeCVRegressor", "lightgbm": "LightGBMRegressor",
         "states+context": "ExpressionStates", "deepsets": "MLPEnsembleRegressor"}


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_model_saved_before_the_format_version_predicts_as_it_did(name):
    predictor = ModelDir(FIXTURE / name.replace("+", "-")).load_predictor()
    reference = np.load(FIXTURE / "inputs.npz")
    X = reference["X"] if predictor.feature_spec.has_context else reference["X"][:, :6]
    # As f50d596 predicted them, to float32's last bit: the references were written on another CPU, whose BLAS
    # kernels round a float32 product's last bit differently (the old and new code agree bit for bit on one machine).
    np.testing.assert_allclose(predictor.predict_features(X), reference[name], rtol=1e-6, atol=1e-6)
    assert predictor.format_version == FORMAT_VERSION and type(predictor.estimator).__name__ == SAVED[name]
    assert predictor.model_name == ("mlp-ensemble" if name == "deepsets" else name)
    assert predictor.scores == {"made_by": "f50d596"} and predictor.data == ""  # a field added since: its default


def test_a_model_saved_now_records_its_format_and_loads_back(tmp_path):
    predictor = ModelDir(FIXTURE / "ridge-context").load_predictor()
    ModelDir(tmp_path).save_predictor(predictor)
    again = ModelDir(tmp_path).load_predictor()
    assert vars(again)["format_version"] == FORMAT_VERSION
    X = np.load(FIXTURE / "inputs.npz")["X"]
    np.testing.assert_array_equal(again.predict_features(X), predictor.predict_features(X))


def test_a_model_of_a_newer_format_is_refused(tmp_path):
    from slidedata.errors import DataError

    predictor = ModelDir(FIXTURE / "mean-profile").load_predictor()
    predictor.format_version = FORMAT_VERSION + 1
    ModelDir(tmp_path).save_predictor(predictor)
    with pytest.raises(DataError, match="this code reads up to"):
        ModelDir(tmp_path).load_predictor()


def test_feature_specs_of_older_models_migrate():
    """Patch sizes saved as text, one radius as a number, no pools yet, a field since removed: the spec rebuilt."""
    from regress.features import FeatureSpec
    from regress.model_format import migrate
    from regress.predictor import ExpressionPredictor
    from slidedata.patch_size import PatchSize

    predictor = ModelDir(FIXTURE / "mean-profile").load_predictor()
    old = object.__new__(FeatureSpec)
    object.__setattr__(old, "__dict__", {
        **vars(FeatureSpec(patch_sizes=(24,))), "patch_sizes": ("24",), "extra_keys": (("uni", "32um"),),
        "keys": (("handcrafted", "24"), ("uni", "32um")), "context_radius": 50.0, "context_weighted": False})
    del old.__dict__["context_pool"]
    state = {k: v for k, v in vars(predictor).items() if k not in ("format_version", "data")}
    older = object.__new__(ExpressionPredictor)
    older.__dict__.update(state, feature_spec=old)
    spec = migrate(older).feature_spec
    assert spec.patch_sizes == (PatchSize(24.0, "px"),) and spec.context_radius == (50.0,)
    assert spec.keys == (("handcrafted", PatchSize(24.0, "px")), ("uni", PatchSize(32.0, "um")))
    assert spec.context_pool == ("mean",) and spec.n_context_blocks == 1 and older.data == ""
