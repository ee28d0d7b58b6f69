"""A synthetic feature cache of the whole challenge: what the fit stage reads, at its real size, without embedding.

Eight samples named like Crunch 1's (DC1 without expression), 1.67 million nuclei in all, features of a 1536-d
encoder at two patch sizes in the real cache format, and sample zarrs whose tables (cell_id-group, anucleus) are full
size while their image and mask are a tiny placeholder: the fit stage reads only the cache and the tables, and the
cache's nuclei table carries the placeholder's input digest, so the readers accept it as embedded from it.

Nuclei, types and expression come from the demo's tissue model (synthetic.tissue / synthetic.demo) at the real slide
size; the features carry a low-rank projection of each nucleus's expression plus noise (float16), different at each
patch size, so the fit has something to learn. One sample in memory at a time, one unit of rows written at a time.

    python benchmarks/full_cache.py --out outputs/bench-scale/full [--scale 0.05]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from embed.encoders import PatchEncoder
from embed.pipeline import EmbedSettings, entry_attrs, patch_plans
from embed.registry import get_spec
from slidedata.feature_store import FeatureStore
from slidedata.nuclei import NUCLEI_COLUMNS
from slidedata.progress import progress_bar
from slidedata.sample import log_normalise, open_sample
from slidedata.writer import write_sample
from synthetic.demo import MICRONS_PER_PIXEL, REAL_SHAPE, sample_tables, simulate_counts
from synthetic.tissue import make_scene

# Nuclei per sample: invented, summing to the challenge's 1.67 million; DC1 has no expression, as in Crunch 1.
CHALLENGE_SAMPLES = (("DC1", 200_000, False), ("DC5", 220_000, True), ("UC1_I", 230_000, True),
                     ("UC1_NI", 180_000, True), ("UC6_I", 210_000, True), ("UC6_NI", 190_000, True),
                     ("UC7_I", 230_000, True), ("UC9_I", 210_000, True))
ENCODER = "uni2-h"  # a 1536-d registry entry
PATCH_SIZES = ("64", "224")
RANK = 32  # dimension of the expression signal hidden in the features
NOISE = 1.0  # feature noise sd; the signal part has unit variance per feature
CHUNK_NUCLEI = 1024
PLACEHOLDER = 64  # px edge of the placeholder image and mask


def nuclei_geometry(scene) -> pd.DataFrame:
    """The nuclei table (NUCLEI_COLUMNS) of a scene's ellipses, computed from their parameters, not a mask."""
    a, b = scene.a, scene.b
    half_y = np.sqrt((a * np.sin(scene.theta)) ** 2 + (b * np.cos(scene.theta)) ** 2)
    half_x = np.sqrt((a * np.cos(scene.theta)) ** 2 + (b * np.sin(scene.theta)) ** 2)
    table = pd.DataFrame({
        "cell_id": scene.cell_ids.astype(np.int64), "y": scene.y, "x": scene.x, "area": np.pi * a * b,
        "y_min": np.floor(scene.y - half_y), "y_max": np.floor(scene.y + half_y),
        "x_min": np.floor(scene.x - half_x), "x_max": np.floor(scene.x + half_x),
        "major_axis": 2 * a, "minor_axis": 2 * b, "eccentricity": np.sqrt(1 - (b / a) ** 2),
    })
    return table[list(NUCLEI_COLUMNS)]


def write_placeholder_sample(path: Path, tables: tuple[pd.DataFrame, object]) -> Path:
    """A sample zarr with the full tables and a tiny image and mask (the fit stage never reads pixels)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, PLACEHOLDER, PLACEHOLDER), dtype=np.uint8)
    mask = np.zeros((PLACEHOLDER, PLACEHOLDER), dtype=np.uint32)
    groups, expression = tables
    return write_sample(path, image, mask, groups, expression, chunk_size=PLACEHOLDER,
                        microns_per_pixel=MICRONS_PER_PIXEL)


def projections(n_genes: int, dim: int, seed: int = 2024) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per patch size: genes -> RANK signal (shared by all samples), RANK -> dim lift (its own per patch size)."""
    rng = np.random.default_rng(seed)
    genes_to_signal = rng.standard_normal((n_genes, RANK)).astype(np.float32) / np.sqrt(n_genes)
    return {key: (genes_to_signal, rng.standard_normal((RANK, dim)).astype(np.float32) / np.sqrt(RANK))
            for key in PATCH_SIZES}


def write_sample_features(store: FeatureStore, sample, nuclei: pd.DataFrame, expression: np.ndarray,
                          encoder: PatchEncoder, seed: int, progress: bool) -> None:
    """Fill every entry of the sample unit by unit: features = lift(project(standardised expression)) + noise."""
    settings = EmbedSettings(patch_sizes=PATCH_SIZES, chunk_nuclei=CHUNK_NUCLEI)
    plans = patch_plans(sample, encoder, settings)
    mean, sd = expression.mean(axis=0), expression.std(axis=0) + 1e-3
    maps = projections(expression.shape[1], encoder.dim)
    for index, (key, plan) in enumerate(plans.items()):
        entry = store.create_entry(sample.name, entry_attrs(encoder, plan, sample, len(nuclei), settings,
                                                            sample.input_digest()))
        to_signal, lift = maps[key]
        for unit in progress_bar(entry.pending_units(), desc=f"{sample.name}: {ENCODER}:{key}", unit="unit",
                                 enabled=progress):
            rows = entry.unit_rows(int(unit))
            rng = np.random.default_rng([seed, index, int(unit)])
            signal = ((expression[rows] - mean) / sd) @ to_signal
            signal /= np.sqrt((to_signal ** 2).sum(axis=0))  # unit variance per signal dimension
            values = signal @ lift + NOISE * rng.standard_normal((rows.stop - rows.start, encoder.dim),
                                                                 dtype=np.float32)
            entry.write_unit(int(unit), values)


def make_full_cache(out: str | Path, scale: float = 1.0, seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Write <out>/data/<sample>.zarr and <out>/features.zarr; `scale` multiplies every sample's nuclei (and its
    slide area, so the density stays the challenge's). A sample whose entries are complete is skipped."""
    out = Path(out)
    data, cache = out / "data", out / "features.zarr"
    data.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(cache)
    encoder = PatchEncoder(get_spec(ENCODER), torch.nn.Identity(), weights_sha256="synthetic")
    height, width = (int(round(side * np.sqrt(scale))) for side in REAL_SHAPE)
    for offset, (name, n_real, with_expression) in enumerate(CHALLENGE_SAMPLES):
        path = data / f"{name}.zarr"
        if path.exists() and _complete(store, name):
            continue
        sample_seed = seed * 1000 + offset
        scene = make_scene((height, width), max(int(round(n_real * scale)), 50), sample_seed)
        everyone = np.arange(len(scene))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_placeholder_sample(path, sample_tables(scene, everyone, sample_seed, with_expression,
                                                         n_genes=460, unmeasured_train_fraction=0.02))
        sample = open_sample(path)
        nuclei = store.write_nuclei(sample, nuclei_geometry(scene), tile_size=4096)
        # The expression of every nucleus (test ones too) in the cache's row order: what the features encode.
        order = np.searchsorted(scene.cell_ids, nuclei["cell_id"].to_numpy())
        expression = log_normalise(simulate_counts(scene, order)).astype(np.float32)
        write_sample_features(store, sample, nuclei, expression, encoder, sample_seed, progress)
        del expression
    return data, cache


def _complete(store: FeatureStore, name: str) -> bool:
    try:
        return all(store.open_entry(name, ENCODER, key).is_complete for key in PATCH_SIZES)
    except Exception:  # absent or half-written: make it again
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench-scale/full", help="folder for data/ and features.zarr")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the challenge's nuclei per sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data, cache = make_full_cache(args.out, args.scale, args.seed)
    print(data, cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
