"""Regress stage: cached features -> multi-output regressors, honest spatial evaluation, saved predictor."""

from regress.engine import Evaluation, HeldOutPredictions, Selection, evaluate, select_and_fit
from regress.features import FeatureSpec, neighbourhood_mean, sample_features
from regress.fit import fit_and_evaluate
from regress.metrics import cellwise_mse, cellwise_spearman, genewise_pearson, official_score
from regress.model_dir import ModelDir
from regress.baselines import MeanProfile, SpatialKNNProfile
from regress.boosting import LightGBMRegressor
from regress.families import REGISTRY, ModelSpec
from regress.ridge import RidgeCVRegressor
from regress.predictor import ExpressionPredictor
from regress.settings import FitSettings
from regress.source import ArraySource, CacheSource, SampleMatrix

__all__ = [
    "ArraySource", "CacheSource", "Evaluation", "ExpressionPredictor", "FeatureSpec", "FitSettings",
    "HeldOutPredictions", "LightGBMRegressor", "MeanProfile", "ModelDir", "ModelSpec", "REGISTRY", "RidgeCVRegressor", "SampleMatrix",
    "Selection", "SpatialKNNProfile", "cellwise_mse", "cellwise_spearman", "evaluate", "fit_and_evaluate",
    "genewise_pearson", "neighbourhood_mean", "official_score", "sample_features", "select_and_fit",
]
