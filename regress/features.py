"""Feature matrices from the cache: several (encoder, patch size) blocks, nucleus shape and neighbourhood context."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from slidedata.feature_store import FeatureStore

MORPHOLOGY_COLUMNS = ("area", "major_axis", "minor_axis", "eccentricity")


@dataclass(frozen=True)
class FeatureSpec:
    """Which cached features a model reads; saved with the model so prediction rebuilds exactly the same matrix."""

    encoder: str = "handcrafted"
    patch_sizes: tuple[int, ...] = (32, 64, 128, 224)
    extra_keys: tuple[tuple[str, int], ...] = ()  # more (encoder, patch size) blocks, e.g. from a second encoder
    morphology: bool = True  # nucleus area and ellipse axes from the mask
    context_k: int = 0  # append the mean features of the k nearest nuclei (0 = none)
    context_weighted: bool = False  # weight neighbours by a Gaussian of their distance instead of equally
    context_radius: float | None = None  # px: average all nuclei within this radius instead of the k nearest
    keys: tuple[tuple[str, int], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "keys", tuple((self.encoder, int(s)) for s in self.patch_sizes) + self.extra_keys)

    def describe(self) -> str:
        base = f"{self.encoder}@{'/'.join(str(s) for s in self.patch_sizes)}"
        if self.context_radius:
            return base + f"+ctx{self.context_radius:g}px"
        return base + (f"+ctx{self.context_k}" if self.context_k else "")


def radius_mean(coords: np.ndarray, features: np.ndarray, radius: float) -> np.ndarray:
    """Mean features of the other nuclei within `radius` px of each nucleus (zeros where there are none)."""
    tree = cKDTree(coords)
    pairs = tree.query_pairs(radius, output_type="ndarray")
    rows = np.r_[pairs[:, 0], pairs[:, 1]]
    cols = np.r_[pairs[:, 1], pairs[:, 0]]
    sums = np.zeros_like(features, dtype=np.float64)
    np.add.at(sums, rows, features[cols])
    counts = np.bincount(rows, minlength=len(coords))[:, None]
    return (sums / np.maximum(counts, 1)).astype(features.dtype)


def neighbourhood_mean(coords: np.ndarray, features: np.ndarray, k: int, weighted: bool = False) -> np.ndarray:
    """Mean features of each nucleus' k nearest other nuclei (KD-tree), optionally Gaussian distance-weighted."""
    k_eff = min(k + 1, len(coords))
    if k_eff < 2:
        return np.zeros_like(features)
    distances, idx = cKDTree(coords).query(coords, k=k_eff)
    distances, idx = distances[:, 1:], idx[:, 1:]  # the nucleus itself is its own nearest neighbour
    if not weighted:
        return features[idx].mean(axis=1)
    bandwidth = np.median(distances[:, -1]) + 1e-6
    weights = np.exp(-((distances / bandwidth) ** 2))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkd->nd", weights, features[idx])


def sample_features(store: FeatureStore, sample_name: str, spec: FeatureSpec,
                    nuclei: pd.DataFrame | None = None) -> np.ndarray:
    """(n_nuclei, n_features) float32 in the cache's nucleus order."""
    nuclei = store.read_nuclei(sample_name) if nuclei is None else nuclei
    blocks = [store.read_features(sample_name, encoder, size) for encoder, size in spec.keys]
    if spec.morphology:
        blocks.append(np.log1p(nuclei[list(MORPHOLOGY_COLUMNS)].to_numpy(np.float32)))
    base = np.concatenate(blocks, axis=1).astype(np.float32)
    coords = nuclei[["y", "x"]].to_numpy(np.float64)
    if spec.context_radius:
        base = np.concatenate([base, radius_mean(coords, base, spec.context_radius)], axis=1)
    elif spec.context_k:
        base = np.concatenate([base, neighbourhood_mean(coords, base, spec.context_k, spec.context_weighted)], axis=1)
    return base
