"""Patch (context) sizes, in slide pixels or in microns, and the one set of defaults every stage uses.

A size is written `64` (pixels of the slide) or `32um` (microns of tissue, the same on any scanner). The written
form is also the key of the size in the feature cache, so `64` and `64um` never share an entry. Text is parsed once,
where it enters (the CLI's `patch_size_arg`, or `patch_sizes` in a settings object's constructor); inside, a size is
a `PatchSize`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slidedata.errors import DataError

_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(px|um|µm)?\s*$")


@dataclass(frozen=True)
class PatchSize:
    value: float
    unit: str  # 'px' | 'um'

    @classmethod
    def parse(cls, text: "str | int | float | PatchSize") -> "PatchSize":
        if isinstance(text, PatchSize):
            return text
        match = _PATTERN.match(str(text))
        if not match or float(match.group(1)) <= 0:
            raise ValueError(f"patch size '{text}': expected a positive number of pixels (64) or microns (32um)")
        unit = "px" if match.group(2) in (None, "px") else "um"
        value = float(match.group(1))
        if unit == "px" and value != int(value):
            raise ValueError(f"patch size '{text}': pixels must be whole")
        return cls(value, unit)

    @property
    def key(self) -> str:
        """Canonical written form: '64' or '32um' (the cache key)."""
        number = f"{self.value:.12g}"  # no exponent for any size a slide can hold, so keys parse back
        return number if self.unit == "px" else f"{number}um"

    def pixels(self, microns_per_pixel: float | None, sample: str = "") -> int:
        """The crop's edge in slide pixels; a size in microns needs the slide's pixel size."""
        if self.unit == "px":
            return int(self.value)
        if microns_per_pixel is None:
            raise DataError(sample or "-", "HE_original",
                            f"patch size {self.key} is in microns but the sample's pixel size is unknown: store it "
                            "with the sample or pass --microns-per-pixel")
        return max(int(round(self.value / microns_per_pixel)), 2)

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:  # how argparse shows a default, and what a person reads in a log
        return self.key


def patch_sizes(sizes) -> tuple[PatchSize, ...]:
    """Several sizes (ints, strings or PatchSize) as PatchSize, order kept."""
    return tuple(PatchSize.parse(s) for s in sizes)


# Pixels of a Xenium slide (0.2125 um/px): a nucleus, its neighbours, and two wider contexts.
DEFAULT_PATCH_SIZES: tuple[PatchSize, ...] = patch_sizes(("32", "64", "128", "224"))


def patch_size_arg(text: str) -> PatchSize:
    """argparse `type=` for patch sizes: the parsed size, or a usage error naming the bad value."""
    import argparse

    try:
        return PatchSize.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
