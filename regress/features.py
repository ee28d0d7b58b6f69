"""Feature matrices from the cache: several (encoder, patch size) blocks, nucleus shape and neighbourhood context."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from slidedata.feature_store import FeatureStore
from slidedata.patch_size import DEFAULT_PATCH_SIZES, PatchSize, patch_keys

MORPHOLOGY_COLUMNS = ("area", "major_axis", "minor_axis", "eccentricity")
FEATURE_DTYPE = np.float16


@dataclass(frozen=True)
class FeatureSpec:
    """Which cached features a model reads; saved with the model so prediction rebuilds exactly the same matrix."""

    encoder: str = "handcrafted"
    patch_sizes: tuple[str, ...] = DEFAULT_PATCH_SIZES  # '64' (slide pixels) or '32um' (microns)
    extra_keys: tuple[tuple[str, str], ...] = ()  # more (encoder, patch size) blocks, e.g. from a second encoder
    morphology: bool = True  # nucleus area and ellipse axes from the mask
    context_k: int = 0  # append the mean features of the k nearest nuclei (0 = none)
    context_weighted: bool = False  # weight neighbours by a Gaussian of their distance instead of equally
    context_radius: float | None = None  # px: average all nuclei within this radius instead of the k nearest
    # z-score every feature within each sample: removes what differs between slides as a whole (stain, scanner,
    # section thickness) and keeps what differs between the nuclei of one slide
    standardize_per_sample: bool = False
    keys: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "patch_sizes", patch_keys(self.patch_sizes))
        object.__setattr__(self, "extra_keys", tuple((e, PatchSize.parse(s).key) for e, s in self.extra_keys))
        object.__setattr__(self, "keys", tuple((self.encoder, s) for s in self.patch_sizes) + self.extra_keys)

    @property
    def has_context(self) -> bool:
        return bool(self.context_radius or self.context_k)


def knn_weights(coords: np.ndarray, k: int, weighted: bool = False) -> sparse.csr_matrix:
    """Row-stochastic (n, n) matrix averaging each nucleus' k nearest other nuclei, optionally Gaussian-weighted."""
    n = len(coords)
    k_eff = min(k + 1, n)
    if k_eff < 2:
        return sparse.csr_matrix((n, n))
    distances, idx = cKDTree(coords).query(coords, k=k_eff)
    distances, idx = distances[:, 1:], idx[:, 1:]  # the nucleus itself is its own nearest neighbour
    if weighted:
        bandwidth = np.median(distances[:, -1]) + 1e-6
        weights = np.exp(-((distances / bandwidth) ** 2))
    else:
        weights = np.ones_like(distances)
    weights /= weights.sum(axis=1, keepdims=True)
    return sparse.csr_matrix((weights.ravel(), idx.ravel(), np.arange(0, n * (k_eff - 1) + 1, k_eff - 1)),
                             shape=(n, n))


def radius_weights(coords: np.ndarray, radius: float) -> sparse.csr_matrix:
    """Row-stochastic (n, n) matrix averaging the other nuclei within `radius` px (empty rows stay zero)."""
    n = len(coords)
    pairs = cKDTree(coords).query_pairs(radius, output_type="ndarray")
    rows, cols = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    counts = np.bincount(rows, minlength=n)
    return sparse.csr_matrix((1.0 / counts[rows], (rows, cols)), shape=(n, n))


def apply_weights(weights: sparse.csr_matrix, features: np.ndarray, block: int = 256) -> np.ndarray:
    """weights @ features, a block of columns at a time: memory stays at the output plus one block."""
    work = np.result_type(features.dtype, np.float32)
    out = np.empty(features.shape, dtype=features.dtype)
    for start in range(0, features.shape[1], block):
        columns = slice(start, start + block)
        out[:, columns] = weights @ features[:, columns].astype(work)
    return out


def neighbourhood_mean(coords: np.ndarray, features: np.ndarray, k: int, weighted: bool = False) -> np.ndarray:
    """Mean features of each nucleus' k nearest other nuclei (KD-tree), optionally Gaussian distance-weighted."""
    return apply_weights(knn_weights(coords, k, weighted), features)


def radius_mean(coords: np.ndarray, features: np.ndarray, radius: float) -> np.ndarray:
    """Mean features of the other nuclei within `radius` px of each nucleus (zeros where there are none)."""
    return apply_weights(radius_weights(coords, radius), features)


def standardize_columns(block: np.ndarray, columns: int = 256) -> None:
    """In place: each column minus its mean, over its standard deviation (constant columns become 0)."""
    for start in range(0, block.shape[1], columns):
        part = block[:, start: start + columns].astype(np.float64)
        spread = part.std(0)
        part = (part - part.mean(0)) / np.where(spread > 1e-8, spread, 1.0)
        block[:, start: start + columns] = part


def sample_features(store: FeatureStore, sample_name: str, spec: FeatureSpec,
                    nuclei: pd.DataFrame | None = None) -> np.ndarray:
    """(n_nuclei, n_features) in the cache's nucleus order.

    float16, like the cache itself: the matrix of a whole dataset is the fit stage's largest object, and the
    estimators convert one block of rows at a time.
    """
    nuclei = store.read_nuclei(sample_name) if nuclei is None else nuclei
    entries = [store.open_entry(sample_name, encoder, size) for encoder, size in spec.keys]
    base_width = sum(e.features.shape[1] for e in entries) + (len(MORPHOLOGY_COLUMNS) if spec.morphology else 0)
    out = np.empty((len(nuclei), base_width * (2 if spec.has_context else 1)), dtype=FEATURE_DTYPE)
    offset = 0
    for entry in entries:
        out[:, offset: offset + entry.features.shape[1]] = entry.read()
        offset += entry.features.shape[1]
    if spec.morphology:
        out[:, offset: base_width] = np.log1p(nuclei[list(MORPHOLOGY_COLUMNS)].to_numpy(np.float32))
    if spec.standardize_per_sample:
        standardize_columns(out[:, :base_width])
    if spec.has_context:
        coords = nuclei[["y", "x"]].to_numpy(np.float64)
        weights = radius_weights(coords, spec.context_radius) if spec.context_radius else \
            knn_weights(coords, spec.context_k, spec.context_weighted)
        out[:, base_width:] = apply_weights(weights, out[:, :base_width])
    return out
