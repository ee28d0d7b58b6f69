"""Nucleus-centred patches at several context sizes, cut tile by tile.

A unit of work is one chunk of rows of the feature cache. Its nuclei are in tile order, so it touches one or two
image tiles; each tile (plus a margin of half the largest patch) is read once and every nucleus in it is cut with one
fancy-indexing call on a strided view. Workers own contiguous runs of units and keep their last tile, so each tile
is read about once per worker, and no worker ever holds more than a tile and its margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import IterableDataset, get_worker_info

from slidedata import locks
from slidedata.sample import Sample


def cut_patches(region: np.ndarray, centres_y: np.ndarray, centres_x: np.ndarray, size: int) -> np.ndarray:
    """(C, h, w) region, integer centres in region coordinates -> (n, C, size, size) copies."""
    windows = sliding_window_view(region, (size, size), axis=(1, 2))  # (C, h-size+1, w-size+1, size, size)
    half = size // 2
    cut = windows[:, centres_y - half, centres_x - half]  # (C, n, size, size)
    return np.ascontiguousarray(cut.transpose(1, 0, 2, 3))


@dataclass
class UnitPatches:
    """Everything cut for one unit: per patch size, uint8 patches (n, 3, S, S) and optional masks (n, 2, S, S)."""

    unit: int
    patches: dict[int, torch.Tensor]
    masks: dict[int, torch.Tensor]


class TileReader:
    """Reads tile + margin windows of a sample, keeping the last one (consecutive units share tiles)."""

    def __init__(self, sample: Sample, tile_size: int, margin: int, with_mask: bool, pad_mode: str = "symmetric",
                 stain_normalizer=None):
        self.sample, self.tile_size, self.margin = sample, tile_size, margin
        self.with_mask, self.pad_mode, self.stain_normalizer = with_mask, pad_mode, stain_normalizer
        self._key: tuple[int, int] | None = None
        self._window: tuple[np.ndarray, np.ndarray | None, int, int] | None = None
        self.tiles_read = 0

    def window(self, tile_y: int, tile_x: int) -> tuple[np.ndarray, np.ndarray | None, int, int]:
        """(image (3, h, w), mask (h, w) or None, y0, x0) of the tile with its margin, in slide coordinates."""
        if self._key != (tile_y, tile_x):
            y0 = tile_y * self.tile_size - self.margin
            x0 = tile_x * self.tile_size - self.margin
            y1 = (tile_y + 1) * self.tile_size + self.margin
            x1 = (tile_x + 1) * self.tile_size + self.margin
            image = self.sample.read_image(y0, y1, x0, x1, self.pad_mode)
            if self.stain_normalizer is not None:  # once per tile read, not per unit
                image = self.stain_normalizer.transform(image)
            mask = self.sample.read_mask(y0, y1, x0, x1) if self.with_mask else None
            self._key, self._window = (tile_y, tile_x), (image, mask, y0, x0)
            self.tiles_read += 1
        return self._window


def unit_patches(reader: TileReader, nuclei: pd.DataFrame, patch_sizes: tuple[int, ...], unit: int) -> UnitPatches:
    """Cut every patch size for the nuclei (rows of one unit) from the tiles they lie in."""
    n = len(nuclei)
    ys = np.rint(nuclei["y"].to_numpy()).astype(np.int64)
    xs = np.rint(nuclei["x"].to_numpy()).astype(np.int64)
    cell_ids = nuclei["cell_id"].to_numpy()
    tile_y, tile_x = ys // reader.tile_size, xs // reader.tile_size
    patches = {s: np.empty((n, 3, s, s), dtype=np.uint8) for s in patch_sizes}
    masks = {s: np.empty((n, 2, s, s), dtype=bool) for s in patch_sizes} if reader.with_mask else {}
    for ty, tx in dict.fromkeys(zip(tile_y.tolist(), tile_x.tolist())):
        rows = np.flatnonzero((tile_y == ty) & (tile_x == tx))
        image, mask, y0, x0 = reader.window(ty, tx)
        cy, cx = ys[rows] - y0, xs[rows] - x0
        for size in patch_sizes:
            patches[size][rows] = cut_patches(image, cy, cx, size)
            if mask is not None:
                labels = cut_patches(mask[None], cy, cx, size)[:, 0]
                masks[size][rows, 0] = labels == cell_ids[rows, None, None]
                masks[size][rows, 1] = labels > 0
    return UnitPatches(unit, {s: torch.from_numpy(p) for s, p in patches.items()},
                       {s: torch.from_numpy(m) for s, m in masks.items()})


class UnitPatchDataset(IterableDataset):
    """Yields one `UnitPatches` per pending unit; DataLoader workers split the units into contiguous runs."""

    def __init__(self, sample: Sample, nuclei: pd.DataFrame, units: list[int], chunk_nuclei: int,
                 patch_sizes: tuple[int, ...], tile_size: int, with_mask: bool, pad_mode: str = "symmetric",
                 stain_normalizer=None, claims: "UnitClaims | None" = None):
        self.sample, self.nuclei, self.units = sample, nuclei, list(units)
        self.chunk_nuclei, self.patch_sizes = chunk_nuclei, tuple(sorted(patch_sizes))
        self.tile_size, self.with_mask, self.pad_mode = tile_size, with_mask, pad_mode
        self.stain_normalizer, self.claims = stain_normalizer, claims

    def __iter__(self):
        info = get_worker_info()
        units = contiguous_share(self.units, info.id, info.num_workers) if info else self.units
        reader = TileReader(self.sample, self.tile_size, self.patch_sizes[-1] // 2 + 1, self.with_mask,
                            self.pad_mode, self.stain_normalizer)
        for unit in units:
            if self.claims is not None and not self.claims.claim(unit):
                continue  # another process computes (or has computed) it
            rows = self.nuclei.iloc[unit * self.chunk_nuclei: (unit + 1) * self.chunk_nuclei]
            yield unit_patches(reader, rows, self.patch_sizes, unit)


@dataclass
class UnitClaims:
    """Claims units through lock files just before cutting them, so two processes embedding into one cache take
    different units. Picklable: DataLoader workers claim in the name of the main process (`owner_pid`), which
    releases each lock once the unit's features are written."""

    lock_of: dict[int, Path]  # unit -> its lock file
    done_arrays: list[Path]  # the `done` flags of every entry being filled
    owner_pid: int

    def claim(self, unit: int) -> bool:
        if not locks.try_lock(self.lock_of[unit], self.owner_pid):
            return False
        if all(self._done(path, unit) for path in self.done_arrays):  # finished while we were looking
            locks.release(self.lock_of[unit])
            return False
        return True

    def release(self, unit: int) -> None:
        locks.release(self.lock_of[unit])

    def release_own(self) -> None:
        """Release the locks this process still holds (units claimed but never written, e.g. after an error)."""
        for path in self.lock_of.values():
            holder = locks.holder(path)
            if holder is not None and holder.split()[1] == str(self.owner_pid):
                locks.release(path)

    @staticmethod
    def _done(path: Path, unit: int) -> bool:
        import zarr

        return bool(zarr.open_array(path, mode="r")[unit])


def contiguous_share(items: list, index: int, count: int) -> list:
    """The index-th of `count` contiguous, near-equal runs of `items` (for workers and for ranks)."""
    bounds = np.linspace(0, len(items), count + 1).round().astype(int)
    return list(items[bounds[index]: bounds[index + 1]])
