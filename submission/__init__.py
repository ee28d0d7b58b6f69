"""Submission stage: held-out predictions -> the challenge's 4-column file, validated; the train/infer interface.

`submission.validate` (also `python -m submission.validate`) checks a file; `submission.main` holds `train`/`infer`.
The names below are imported when first used: the `he2expr` command (`submission.cli`) lives in this package and
must start without loading the model stack.
"""

from slidedata.lazy import lazy_exports

_EXPORTS = {"COLUMNS": "submission.writer", "write_submission": "submission.writer",
            "SamplePredictions": "submission.predict", "finalise": "submission.predict",
            "predict_held_out": "submission.predict"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
