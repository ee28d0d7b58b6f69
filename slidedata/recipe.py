"""The default features: which feature blocks the embed stage writes and the fit stage reads when none are named.

One object, `DEFAULT_FEATURES`, holds both defaults and chooses between them by what is known of the samples:

* every sample's pixel size known (stored with the sample, given with `--microns-per-pixel`, or recorded in the
  feature cache when it was embedded): the recipe measured on real H&E nuclei (her2st, leaving one section out;
  benchmarks/bench_real.py's `nuclei` mode): the handcrafted features at 12, 24 and 48 um, EfficientNet-Lite0 at one
  48 um context resampled to 64 px as an extra block, and the neighbours within 50 um for the +context models.
  Handcrafted features alone at pixel sizes lost to the mean profile there (docs/fit.md);
* otherwise: the handcrafted features at 32, 64, 128 and 224 px and the 15 nearest neighbours, which need no pixel
  size.

The embed stage embeds every block of the chosen recipe, and the fit stage, choosing by the same rule on the same
samples, reads exactly those blocks: `make embed` then `make fit` agree without flags. Naming an encoder or patch
sizes opts out: a stage then uses what it was given (and these pixel sizes for what was not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from slidedata.patch_size import DEFAULT_PATCH_SIZES, PatchSize, patch_sizes


@dataclass(frozen=True)
class FeatureBlock:
    """One encoder at one or more patch sizes; `input_size`: the edge its crops are resampled to (None: its own)."""

    encoder: str
    patch_sizes: tuple[PatchSize, ...]
    input_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patch_sizes", patch_sizes(self.patch_sizes))


@dataclass(frozen=True)
class Recipe:
    """Feature blocks (the first is the fit's main encoder, the others its extra blocks) and the neighbourhood of the
    +context models: the `context_k` nearest nuclei, or, where given, all nuclei within each of `context_radius_um`."""

    name: str
    blocks: tuple[FeatureBlock, ...]
    context_k: int = 15
    context_radius_um: tuple[float, ...] = ()

    @property
    def keys(self) -> tuple[tuple[str, PatchSize], ...]:
        """Every (encoder, patch size) entry the recipe embeds, in the fit's column order."""
        return tuple((block.encoder, size) for block in self.blocks for size in block.patch_sizes)

    def context_radius_px(self, microns_per_pixel: float | None) -> tuple[float, ...] | None:
        """The radii in slide pixels (the cache's coordinates), or None where the recipe pools the k nearest."""
        if not self.context_radius_um:
            return None
        if microns_per_pixel is None:
            raise ValueError(f"the {self.name} recipe's neighbourhood is in microns: it needs the pixel size")
        return tuple(radius / microns_per_pixel for radius in self.context_radius_um)

    def describe(self, context: bool = True) -> str:
        """One line: what is embedded (and, with `context`, the +context models' neighbourhood)."""
        blocks = " + ".join(f"{b.encoder} {' '.join(s.key for s in b.patch_sizes)}"
                            + (f" at {b.input_size} px" if b.input_size else "") for b in self.blocks)
        neighbours = (f"neighbours within {', '.join(f'{r:g}' for r in self.context_radius_um)} um"
                      if self.context_radius_um else f"the {self.context_k} nearest neighbours")
        return f"{self.name} recipe: {blocks}" + (f"; {neighbours}" if context else "")


@dataclass(frozen=True)
class DefaultFeatures:
    """The two recipes and the rule that chooses between them (see the module's docstring)."""

    pixel_size_known: Recipe
    pixel_size_unknown: Recipe

    def choose(self, pixel_sizes: Iterable[float | None]) -> tuple[Recipe, float | None]:
        """The recipe for samples of these pixel sizes, and the median pixel size that converts its microns (None
        where some sample's is unknown)."""
        sizes = list(pixel_sizes)
        if not sizes or any(size is None for size in sizes):
            return self.pixel_size_unknown, None
        return self.pixel_size_known, float(np.median(sizes))

    def for_data(self, data: str | Path, cache: str | Path | None = None, microns_per_pixel: float | None = None,
                 force_microns_per_pixel: bool = False, elements=None) -> tuple[Recipe, float | None]:
        """The recipe for every sample under `data`, each with the pixel size it stores or is given, else (with
        `cache`) the one its cached features were embedded with: the embed stage's choice, made again by the fit."""
        from slidedata.feature_store import FeatureStore
        from slidedata.sample import open_samples

        samples = open_samples(data, microns_per_pixel=microns_per_pixel,
                               force_microns_per_pixel=force_microns_per_pixel, elements=elements)
        store = FeatureStore(cache, create=False) if cache is not None else None
        return self.choose(s.microns_per_pixel if s.microns_per_pixel is not None or store is None
                           else store.recorded_pixel_size(s.name) for s in samples)


PIXEL_RECIPE = Recipe("pixel", (FeatureBlock("handcrafted", DEFAULT_PATCH_SIZES),))
MICRON_RECIPE = Recipe("micron", (FeatureBlock("handcrafted", ("12um", "24um", "48um")),
                                  FeatureBlock("efficientnet-lite0", ("48um",), input_size=64)),
                       context_radius_um=(50.0,))
DEFAULT_FEATURES = DefaultFeatures(pixel_size_known=MICRON_RECIPE, pixel_size_unknown=PIXEL_RECIPE)
