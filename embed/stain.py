"""Macenko stain normalisation (Macenko et al., ISBI 2009): optional, off by default.

The slide's haematoxylin and eosin vectors are estimated once, from tissue pixels sampled over the slide, and every
tile is then re-expressed with a reference stain matrix and reference concentration maxima.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slidedata.sample import Sample

REFERENCE_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])  # H, E (rows), unit OD vectors
REFERENCE_MAX = np.array([1.9705, 1.0308])


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1) / 256)


def estimate_stains(pixels: np.ndarray, od_threshold: float = 0.15, alpha: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) RGB pixels -> stain matrix (2, 3) rows H, E and the 99th percentile concentrations (2,)."""
    od = _optical_density(pixels)
    od = od[(od > od_threshold).all(axis=1)]
    if len(od) < 100:
        raise ValueError("too few stained pixels to estimate stain vectors")
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, 1:3]  # the two largest eigenvectors
    angles = np.arctan2(od @ plane[:, 1], od @ plane[:, 0])
    lo, hi = np.percentile(angles, alpha), np.percentile(angles, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])  # haematoxylin has more red OD
    stains = stains * np.sign(stains.sum(axis=1, keepdims=True))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    concentrations = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return stains, np.percentile(concentrations, 99, axis=1)


class MacenkoNormalizer:
    def __init__(self, stains: np.ndarray, max_concentrations: np.ndarray):
        self.stains, self.max_concentrations = stains, max_concentrations

    @classmethod
    def fit_sample(cls, sample: Sample, nuclei: pd.DataFrame, n_windows: int = 16, window: int = 256,
                   seed: int = 0) -> "MacenkoNormalizer":
        """Estimate the slide's stains from windows centred on randomly chosen nuclei (so on tissue)."""
        rng = np.random.default_rng(seed)
        picks = nuclei.iloc[rng.choice(len(nuclei), size=min(n_windows, len(nuclei)), replace=False)]
        half = window // 2
        pixels = [sample.read_image(int(r.y) - half, int(r.y) + half, int(r.x) - half, int(r.x) + half)
                  .reshape(3, -1).T for r in picks.itertuples()]
        return cls(*estimate_stains(np.concatenate(pixels)))

    def transform(self, image: np.ndarray) -> np.ndarray:
        """(3, h, w) uint8 -> the same tissue in the reference stains, uint8."""
        od = _optical_density(image.reshape(3, -1).T)
        concentrations = np.linalg.lstsq(self.stains.T, od.T, rcond=None)[0]
        concentrations *= (REFERENCE_MAX / self.max_concentrations)[:, None]
        rgb = 256 * np.exp(-(REFERENCE_STAINS.T @ concentrations)) - 1
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(image.shape)
