"""Shared data layer: Crunch-format samples, their validation and writer, nucleus geometry, the feature cache."""

from slidedata.errors import DataError
from slidedata.nuclei import nuclei_from_mask
from slidedata.sample import (
    EXPRESSION, GROUPS, HELD_OUT_GROUPS, IMAGE, MASK, CHALLENGE_N_GENES, Elements, Sample, open_sample, open_samples,
)

__all__ = [
    "DataError", "EXPRESSION", "GROUPS", "HELD_OUT_GROUPS", "IMAGE", "MASK", "CHALLENGE_N_GENES", "Elements", "Sample",
    "nuclei_from_mask", "open_sample", "open_samples",
]
