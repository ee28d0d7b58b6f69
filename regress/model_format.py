"""The saved model's format: its version, and the one migration step that brings older models up to it.

A model directory's `predictor.joblib` is the pickled `ExpressionPredictor`, which records `format_version`.
Models saved before the version existed are format 0 (the code of f50d596 and earlier). Loading goes through
`load`: the unpickler finds classes that moved (`MOVED`: the module split, `deepsets` renamed `mlp-ensemble`), then
`migrate` brings the loaded object's state to the current format. Nothing else in the package knows an old format.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

from joblib.numpy_pickle import NumpyUnpickler

from regress.boosting import LightGBMRegressor
from regress.components import ComponentInputs
from regress.families import renamed
from regress.features import FeatureSpec
from regress.predictor import FORMAT_VERSION, ExpressionPredictor

# (module, class) as format 0 pickled them -> where they are now
MOVED = {
    ("regress.models", "MomentStats"): ("regress.ridge", "MomentStats"),
    ("regress.models", "RidgeCVRegressor"): ("regress.ridge", "RidgeCVRegressor"),
    ("regress.models", "LightGBMRegressor"): ("regress.boosting", "LightGBMRegressor"),
    ("regress.models", "MeanProfile"): ("regress.baselines", "MeanProfile"),
    ("regress.models", "SpatialKNNProfile"): ("regress.baselines", "SpatialKNNProfile"),
    ("regress.models", "ComponentInputs"): ("regress.components", "ComponentInputs"),
    ("regress.deepsets", "DeepSetsRegressor"): ("regress.mlp_ensemble", "MLPEnsembleRegressor"),
}


class _Unpickler(NumpyUnpickler):
    """joblib's unpickler (it reads the arrays joblib writes beside the pickle), finding moved classes."""

    def find_class(self, module: str, name: str):
        return super().find_class(*MOVED.get((module, name), (module, name)))


def load(path: str | Path) -> object:
    """The object pickled at `path` by joblib (uncompressed, as `ModelDir` writes it), classes found where they are
    now; `migrate` it next."""
    with open(path, "rb") as handle:
        return _Unpickler(str(path), handle, ensure_native_byte_order="auto").load()


def migrate(predictor: ExpressionPredictor) -> ExpressionPredictor:
    """`predictor` brought to FORMAT_VERSION, in place; ValueError for a format newer than this code's."""
    version = vars(predictor).get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"saved in model format {version}; this code reads up to {FORMAT_VERSION}: update he2expr")
    if version == 0:
        _from_format_0(predictor)
    return predictor


def _from_format_0(predictor: ExpressionPredictor) -> None:
    """Fields added over time take their defaults; the feature spec is rebuilt through its constructor (patch sizes
    once saved as text become typed; a removed field goes); the estimator gets the parameters added since (at
    their defaults, which is what it was fitted with) and the fitted state the current class keeps."""
    state = vars(predictor)
    for f in fields(ExpressionPredictor):
        if f.name not in state:
            state[f.name] = f.default_factory() if f.default is MISSING else f.default
    predictor.model_name = renamed(predictor.model_name) or predictor.model_name
    spec = vars(predictor.feature_spec)
    predictor.feature_spec = FeatureSpec(**{f.name: spec[f.name] for f in fields(FeatureSpec)
                                            if f.init and f.name in spec})
    estimator = predictor.estimator
    for name, parameter in inspect.signature(type(estimator).__init__).parameters.items():
        if name != "self" and name not in vars(estimator):
            setattr(estimator, name, parameter.default)
    estimator.y_ndim_ = 2  # format 0 estimators were fitted on 2-D expression
    if isinstance(estimator, LightGBMRegressor) and "inputs_" not in vars(estimator):
        estimator.inputs_ = ComponentInputs(estimator.__dict__.pop("x_mean_"), estimator.__dict__.pop("x_scale_"),
                                            estimator.__dict__.pop("x_components_"), 1.0)
    predictor.format_version = FORMAT_VERSION
