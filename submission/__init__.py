"""Submission stage: held-out predictions -> the challenge's 4-column file, validated; the train/infer interface.

`submission.validate` (also `python -m submission.validate`) checks a file; `submission.main` holds `train`/`infer`.
"""

from submission.predict import SamplePredictions, finalise, predict_held_out
from submission.writer import COLUMNS, write_submission

__all__ = ["COLUMNS", "SamplePredictions", "finalise", "predict_held_out", "write_submission"]
