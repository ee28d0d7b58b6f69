"""Nucleus geometry from a label mask in one streaming pass over its chunks.

A 20k x 22k mask holds ~200k nuclei; comparing the mask with each id would read it 200k times. Instead each chunk
contributes partial sums (pixel count, first and second coordinate moments, bounding box) per id, and the partials
of nuclei cut by chunk borders are merged at the end.
"""

from __future__ import annotations

from typing import TypeVar

import dask.array as da
import numpy as np
import pandas as pd

from slidedata.progress import progress_bar

NUCLEI_COLUMNS = ("cell_id", "y", "x", "area", "y_min", "y_max", "x_min", "x_max",
                  "major_axis", "minor_axis", "eccentricity")
_SUMS = ("area", "sy", "sx", "syy", "sxx", "sxy")
# Recorded with every cached nuclei table: a table made by other geometry code is recomputed (see FeatureStore.nuclei).
# Bump it when the numbers of the columns change. 2: ellipse axes as regionprops computes them (no +1/12 px^2).
GEOMETRY_VERSION = "nuclei-2"
# Moments (px^2) at or below this are a point: float32 round-off of a one-pixel region's moments, not a shape.
_POINT = 1e-6

Moments = TypeVar("Moments")  # numpy arrays or torch tensors: the function below uses operators and `clip` only


def ellipse_from_moments(cyy: Moments, cxx: Moments, cxy: Moments) -> tuple[Moments, Moments, Moments]:
    """Major axis, minor axis and eccentricity of the ellipse with a region's central second moments (per pixel).

    As skimage.measure.regionprops computes them (the reference, tested against it): pixels count as points at their
    centres, with no +1/12 px^2 for their own extent, so a one-pixel-wide line has minor axis 0 and a single pixel
    eccentricity 0. The one definition behind the nuclei table (`merge_moments`) and the handcrafted encoder.
    """
    half_trace = (cyy + cxx) / 2
    spread = (((cyy - cxx) / 2) ** 2 + cxy * cxy) ** 0.5
    lam1 = (half_trace + spread).clip(min=0)
    lam2 = (half_trace - spread).clip(min=0)
    eccentricity = (1 - lam2 / lam1.clip(min=_POINT)).clip(min=0) ** 0.5 * (lam1 > _POINT)
    return 4 * lam1**0.5, 4 * lam2**0.5, eccentricity


class BadCellIds(ValueError):
    """Mask pixel values that cannot be cell ids: every table, cache and submission holds ids as int64."""


def block_moments(block: np.ndarray, y_offset: int, x_offset: int) -> pd.DataFrame:
    """Per-id partial moments of one mask block (ids > 0), in slide coordinates."""
    ys, xs = np.nonzero(block)
    if len(ys) == 0:
        return pd.DataFrame(columns=("cell_id",) + _SUMS + ("y_min", "y_max", "x_min", "x_max"))
    ids = _as_cell_ids(block[ys, xs], y_offset, x_offset)
    ys = ys.astype(np.float64) + y_offset
    xs = xs.astype(np.float64) + x_offset
    order = np.argsort(ids, kind="stable")
    ids, ys, xs = ids[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    def total(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, starts)
    return pd.DataFrame({
        "cell_id": ids[starts],
        "area": np.diff(np.r_[starts, len(ids)]).astype(np.float64),
        "sy": total(ys), "sx": total(xs),
        "syy": total(ys * ys), "sxx": total(xs * xs), "sxy": total(ys * xs),
        "y_min": np.minimum.reduceat(ys, starts), "y_max": np.maximum.reduceat(ys, starts),
        "x_min": np.minimum.reduceat(xs, starts), "x_max": np.maximum.reduceat(xs, starts),
    })


def _as_cell_ids(values: np.ndarray, y_offset: int, x_offset: int) -> np.ndarray:
    """`values` as int64, refusing what int64 cannot hold as a positive id (uint64 from 2**63 would wrap to negative
    ids, and negative ones are no ids): a wrapped id would be written to the submission and match nothing."""
    where = f"the mask chunk at row {y_offset}, column {x_offset}"
    if values.dtype.kind == "u" and values.dtype.itemsize >= 8 and values.max() > np.iinfo(np.int64).max:
        raise BadCellIds(f"{where} holds cell_id {int(values.max())}, above the largest supported id "
                         f"{np.iinfo(np.int64).max} (2**63 - 1): renumber the nuclei")
    if values.dtype.kind == "i" and values.min() < 0:
        raise BadCellIds(f"{where} holds the negative value {int(values.min())}; cell ids are positive integers "
                         "(0 = background)")
    return values.astype(np.int64)


def merge_moments(partials: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine block partials into one row per nucleus with centroid, area, bounding box and ellipse axes."""
    partials = [p for p in partials if len(p)]
    if not partials:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "cell_id" else np.float64) for c in NUCLEI_COLUMNS})
    stacked = pd.concat(partials, ignore_index=True)
    agg = {name: "sum" for name in _SUMS}
    agg.update(y_min="min", x_min="min", y_max="max", x_max="max")
    merged = stacked.groupby("cell_id", sort=True).agg(agg).reset_index()
    n = merged["area"].to_numpy()
    y, x = merged["sy"].to_numpy() / n, merged["sx"].to_numpy() / n
    major, minor, eccentricity = ellipse_from_moments(merged["syy"].to_numpy() / n - y * y,
                                                      merged["sxx"].to_numpy() / n - x * x,
                                                      merged["sxy"].to_numpy() / n - y * x)
    table = pd.DataFrame({
        "cell_id": merged["cell_id"].astype(np.int64),
        "y": y, "x": x, "area": n,
        "y_min": merged["y_min"], "y_max": merged["y_max"], "x_min": merged["x_min"], "x_max": merged["x_max"],
        "major_axis": major, "minor_axis": minor, "eccentricity": eccentricity,
    })
    return table[list(NUCLEI_COLUMNS)]


def nuclei_from_mask(mask: da.Array | np.ndarray, progress: bool = False, desc: str = "nuclei") -> pd.DataFrame:
    """One row per nucleus id of a (H, W) label mask, sorted by cell_id. Reads each mask chunk exactly once."""
    mask = da.asarray(mask) if not isinstance(mask, da.Array) else mask
    y_starts = np.r_[0, np.cumsum(mask.chunks[0])[:-1]]
    x_starts = np.r_[0, np.cumsum(mask.chunks[1])[:-1]]
    partials = []
    blocks = list(np.ndindex(*mask.numblocks))
    for by, bx in progress_bar(blocks, desc=desc, unit="chunk", enabled=progress):
        block = np.asarray(mask.blocks[by, bx].compute(scheduler="synchronous"))
        partials.append(block_moments(block, int(y_starts[by]), int(x_starts[bx])))
    return merge_moments(partials)
