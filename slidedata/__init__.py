"""The floor every stage stands on: Crunch-format samples (reading, checking, writing), nucleus geometry, the
feature cache and its locks, publishing files whole, held-out truth, and the command lines' error convention."""

from slidedata.errors import DataError
from slidedata.nuclei import nuclei_from_mask
from slidedata.sample import (
    EXPRESSION, GROUPS, HELD_OUT_GROUPS, IMAGE, MASK, CHALLENGE_N_GENES, Sample, open_sample, open_samples,
)

__all__ = [
    "DataError", "EXPRESSION", "GROUPS", "HELD_OUT_GROUPS", "IMAGE", "MASK", "CHALLENGE_N_GENES", "Sample",
    "nuclei_from_mask", "open_sample", "open_samples",
]
