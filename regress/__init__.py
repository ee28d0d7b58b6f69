"""Regress stage: cached features -> multi-output regressors, honest spatial evaluation, saved predictor."""

from regress.features import FeatureSpec, neighbourhood_mean, sample_features
from regress.fit import FitSettings, fit_and_evaluate
from regress.metrics import cellwise_mse, cellwise_spearman, genewise_pearson, official_score
from regress.model_dir import ModelDir
from regress.models import LightGBMRegressor, MeanProfile, RidgeCVRegressor, SpatialKNNProfile
from regress.predictor import ExpressionPredictor

__all__ = [
    "ExpressionPredictor", "FeatureSpec", "FitSettings", "LightGBMRegressor", "MeanProfile", "ModelDir", "RidgeCVRegressor",
    "SpatialKNNProfile", "cellwise_mse", "cellwise_spearman", "fit_and_evaluate", "genewise_pearson",
    "neighbourhood_mean", "official_score", "sample_features",
]
