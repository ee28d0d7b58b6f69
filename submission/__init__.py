"""Submission stage: held-out predictions -> the challenge's 4-column file, validated; the train/infer interface."""

from submission.predict import SamplePredictions, finalise, predict_held_out
from submission.validate import Problem, validate_submission
from submission.writer import COLUMNS, write_submission

__all__ = ["COLUMNS", "Problem", "SamplePredictions", "finalise", "predict_held_out", "validate_submission",
           "write_submission"]
