"""The floor every stage stands on: Crunch-format samples (reading, checking, writing), nucleus geometry, the
feature cache and its locks, publishing files whole, held-out truth, and the command lines' error convention.

The names below are imported when first used, so that `import slidedata.cli` stays light."""

from slidedata.lazy import lazy_exports

_EXPORTS = {
    "DataError": "slidedata.errors", "nuclei_from_mask": "slidedata.nuclei",
    **{name: "slidedata.sample" for name in ("EXPRESSION", "GROUPS", "HELD_OUT_GROUPS", "IMAGE", "MASK",
                                               "CHALLENGE_N_GENES", "Elements", "Sample", "open_sample",
                                               "open_samples")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
