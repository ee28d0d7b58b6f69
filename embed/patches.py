"""Nucleus-centred patches at several context sizes, cut tile by tile.

A unit of work is one chunk of rows of the feature cache. Its nuclei are in tile order, so it touches one or two
image tiles; each tile (plus a margin of half the largest patch) is read once and every nucleus in it is cut with one
fancy-indexing call. Workers own contiguous runs of units and keep their last tile, so each tile is read about once
per worker, and no worker ever holds more than a tile and its margin (tiles are capped, see slidedata.tiles) plus
the patches of one unit.

A crop the encoder sees smaller (`PatchCut.size < crop`, encoders that resample by area) is averaged while it is cut:
box sums of the whole tile are computed once, and each output pixel of every patch is one look-up in them, so no
full-size copy of a wide crop is ever made. The numbers are those of torch's `F.interpolate(mode="area")` on the
full crop (tested against it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from torch.utils.data import IterableDataset, get_worker_info

from slidedata import locks
from slidedata.errors import DataError
from slidedata.publish import is_disk_full
from slidedata.sample import Sample
from slidedata.tiles import tile_index


@dataclass(frozen=True)
class PatchCut:
    """A `crop` x `crop` slide window around each nucleus, handed over as `size` x `size` pixels: the crop itself
    (uint8) when `size == crop`, else its area average (float32 on the 0-255 scale)."""

    crop: int
    size: int

    @classmethod
    def for_encoder(cls, crop: int, input_size: int, interpolation: str) -> "PatchCut":
        """Shrink while cutting where that gives exactly the encoder's own resampling: area averaging over bins of
        one width (e.g. 128 or 224 px -> 64). Otherwise the crop is cut whole and the encoder resamples it."""
        if interpolation == "area" and input_size < crop and area_bin_width(crop, input_size) is not None:
            return cls(crop, input_size)
        return cls(crop, crop)


def area_bins(crop: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the `size` bins that area resampling averages over: torch's adaptive pooling bins,
    [floor(i * crop / size), ceil((i + 1) * crop / size)), in exact integer arithmetic."""
    i = np.arange(size, dtype=np.int64)
    return (i * crop) // size, -((-(i + 1) * crop) // size)


def area_bin_width(crop: int, size: int) -> int | None:
    """The common width of the area bins, or None where bins differ in width (e.g. 151 -> 64 px)."""
    starts, ends = area_bins(crop, size)
    widths = np.unique(ends - starts)
    return int(widths[0]) if len(widths) == 1 else None


def nearest_offsets(crop: int, size: int) -> np.ndarray:
    """Source pixel of each of `size` output pixels in torch's 'nearest' resampling of `crop` pixels (float32
    scale, as torch computes it), so masks cut at these offsets equal F.interpolate(mode='nearest') of full masks."""
    scale = np.float32(crop) / np.float32(size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64), crop - 1)


def cut_patches(region: np.ndarray, centres_y: np.ndarray, centres_x: np.ndarray, size: int) -> np.ndarray:
    """(C, h, w) region, integer centres in region coordinates -> (n, C, size, size) copies."""
    windows = sliding_window_view(region, (size, size), axis=(1, 2))  # (C, h-size+1, w-size+1, size, size)
    half = size // 2
    cut = windows[:, centres_y - half, centres_x - half]  # (C, n, size, size)
    return np.ascontiguousarray(cut.transpose(1, 0, 2, 3))


def box_sums(image: np.ndarray, width: int) -> np.ndarray:
    """(3, h, w) uint8 -> (h - width + 1, w - width + 1, 3) exact sums of every width x width box, channels last (one
    look-up = one RGB triple). Shifted adds, `width` per axis: far faster than cumulative sums for the small widths
    of patch resampling (224 px -> 64: 4), and exact in 16 bits up to width 16."""
    pixels = np.ascontiguousarray(image.transpose(1, 2, 0))
    height, breadth = pixels.shape[:2]
    dtype = np.uint16 if width * width * 255 < 2**16 else np.uint32
    rows = pixels[: height - width + 1].astype(dtype)
    for shift in range(1, width):
        rows += pixels[shift: shift + height - width + 1]
    boxes = rows[:, : breadth - width + 1].copy()
    for shift in range(1, width):
        boxes += rows[:, shift: shift + breadth - width + 1]
    return boxes


def grid_gather(source: np.ndarray, top: np.ndarray, left: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """source[top + offsets[i], left + offsets[j], ...] for each of n grid origins, as an (n, K, b, K, b, ...) view
    of a copy; reshape the first five axes to (n, k, k) (k = len(offsets) = K * b).

    Resampling offsets repeat with a period: offsets[i + b] = offsets[i] + a (224 px -> 64: b = 2, a = 7), so the
    grid is b x b strided blocks of K x K pixels, copied block by block: several times faster than one look-up per
    pixel. Offsets with no shorter period are b = k single-pixel blocks (the plain gather)."""
    k = len(offsets)
    period = next(b for b in range(1, k + 1) if k % b == 0 and (
        b == k or np.all(offsets[b:] - offsets[:-b] == offsets[b] - offsets[0])))
    blocks, step = k // period, int(offsets[period] - offsets[0]) if period < k else 0
    reach = step * (blocks - 1)
    strided = as_strided(source, (source.shape[0] - reach, source.shape[1] - reach, blocks, blocks) + source.shape[2:],
                         source.strides[:2] + (step * source.strides[0], step * source.strides[1]) + source.strides[2:])
    phase = offsets[:period]
    cut = strided[(top[:, None] + phase)[:, :, None], (left[:, None] + phase)[:, None, :]]  # (n, b, b, K, K, ...)
    return cut.transpose((0, 3, 1, 4, 2) + tuple(range(5, cut.ndim)))


@dataclass
class UnitPatches:
    """Everything cut for one unit, keyed by crop: patches (n, 3, s, s) (uint8, or float32 when shrunk) and
    optional masks (n, 2, s, s) bool (this nucleus, any nucleus), s = the cut's size."""

    unit: int
    patches: dict[int, torch.Tensor]
    masks: dict[int, torch.Tensor]

    @property
    def n_nuclei(self) -> int:
        return int(next(iter(self.patches.values())).shape[0])


@dataclass
class UnitFeatures:
    """One unit already encoded where it was cut (a CPU worker): features (n, dim) per cache entry key."""

    unit: int
    n_nuclei: int
    features: dict[str, np.ndarray]


class TileReader:
    """Reads tile + margin windows of a sample, keeping the last one (consecutive units share tiles), and the box
    sums of it that shrinking cuts need."""

    def __init__(self, sample: Sample, tile_size: int, margin: int, with_mask: bool, pad_mode: str = "symmetric",
                 stain_normalizer=None):
        self.sample, self.tile_size, self.margin = sample, tile_size, margin
        self.with_mask, self.pad_mode, self.stain_normalizer = with_mask, pad_mode, stain_normalizer
        self._key: tuple[int, int] | None = None
        self._window: tuple[np.ndarray, np.ndarray | None, int, int] | None = None
        self._boxes: dict[int, np.ndarray] = {}
        self.tiles_read = 0

    def window(self, tile_y: int, tile_x: int) -> tuple[np.ndarray, np.ndarray | None, int, int]:
        """(image (3, h, w), mask (h, w) or None, y0, x0) of the tile with its margin, in slide coordinates."""
        if self._key != (tile_y, tile_x):
            self._window = self._boxes = None  # free the old tile before reading the next
            y0 = tile_y * self.tile_size - self.margin
            x0 = tile_x * self.tile_size - self.margin
            y1 = (tile_y + 1) * self.tile_size + self.margin
            x1 = (tile_x + 1) * self.tile_size + self.margin
            image = self.sample.read_image(y0, y1, x0, x1, self.pad_mode)
            if self.stain_normalizer is not None:  # once per tile read, not per unit
                image = self.stain_normalizer.transform(image)
            mask = self.sample.read_mask(y0, y1, x0, x1) if self.with_mask else None
            self._key, self._window, self._boxes = (tile_y, tile_x), (image, mask, y0, x0), {}
            self.tiles_read += 1
        return self._window

    def boxes(self, width: int) -> np.ndarray:
        """`box_sums` of the current window's image, computed once per tile and width."""
        if width not in self._boxes:
            self._boxes[width] = box_sums(self._window[0], width)
        return self._boxes[width]


def _shrink_into(out: np.ndarray, reader: TileReader, cy: np.ndarray, cx: np.ndarray, cut: PatchCut) -> None:
    """Write into `out` (n, 3, size, size) float32 the area averages of the crops centred at (cy, cx) (window
    coordinates)."""
    starts, ends = area_bins(cut.crop, cut.size)
    width = int(ends[0] - starts[0])
    boxes = reader.boxes(width)
    half = cut.crop // 2
    sums = grid_gather(boxes, cy - half, cx - half, starts)  # (n, K, b, K, b, 3)
    grid = np.reshape(out, out.shape[:2] + sums.shape[1:5], copy=False)  # a view: written in place
    np.divide(sums.transpose(0, 5, 1, 2, 3, 4), width * width, out=grid, casting="unsafe")


def unit_patches(reader: TileReader, nuclei: pd.DataFrame, cuts: tuple[PatchCut, ...], unit: int) -> UnitPatches:
    """Cut every patch size for the nuclei (rows of one unit) from the tiles they lie in."""
    n = len(nuclei)
    y, x = nuclei["y"].to_numpy(), nuclei["x"].to_numpy()
    # The tile order's own rule (not the rounded centre), so a unit visits each of its tiles once; a centre rounded
    # onto the next tile's first pixel is still inside this tile's margin.
    tile_y, tile_x = tile_index(y, reader.tile_size), tile_index(x, reader.tile_size)
    # Rows of one tile are consecutive in a table in tile order; sorting (stable) makes them so in any table, and
    # lets every cut be written straight into its slice of the unit's arrays.
    order = np.lexsort((tile_x, tile_y))
    in_order = bool((order == np.arange(n)).all())
    ys, xs = np.rint(y[order]).astype(np.int64), np.rint(x[order]).astype(np.int64)
    cell_ids, tile_y, tile_x = nuclei["cell_id"].to_numpy()[order], tile_y[order], tile_x[order]
    patches = {c.crop: np.empty((n, 3, c.size, c.size), dtype=np.uint8 if c.size == c.crop else np.float32)
               for c in cuts}
    masks = {c.crop: np.empty((n, 2, c.size, c.size), dtype=bool) for c in cuts} if reader.with_mask else {}
    bounds = np.flatnonzero(np.diff(tile_y) | np.diff(tile_x)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, n]):
        rows = slice(int(start), int(stop))
        image, mask, y0, x0 = reader.window(int(tile_y[start]), int(tile_x[start]))
        cy, cx = ys[rows] - y0, xs[rows] - x0
        for cut in cuts:
            if cut.size == cut.crop:
                patches[cut.crop][rows] = cut_patches(image, cy, cx, cut.crop)
            else:
                _shrink_into(patches[cut.crop][rows], reader, cy, cx, cut)
            if mask is not None:
                half = cut.crop // 2
                labels = grid_gather(mask, cy - half, cx - half, nearest_offsets(cut.crop, cut.size))
                own, anyn = (np.reshape(masks[cut.crop][rows, c], labels.shape, copy=False) for c in (0, 1))
                np.equal(labels, cell_ids[rows, None, None, None, None], out=own)
                np.greater(labels, 0, out=anyn)
    if not in_order:
        back = np.argsort(order)
        patches = {k: v[back] for k, v in patches.items()}
        masks = {k: v[back] for k, v in masks.items()}
    return UnitPatches(unit, {s: torch.from_numpy(p) for s, p in patches.items()},
                       {s: torch.from_numpy(m) for s, m in masks.items()})


class UnitPatchDataset(IterableDataset):
    """Yields one `UnitPatches` per pending unit; DataLoader workers split the units into contiguous runs."""

    def __init__(self, sample: Sample, nuclei: pd.DataFrame, units: list[int], chunk_nuclei: int,
                 cuts: tuple[PatchCut, ...], tile_size: int, with_mask: bool, pad_mode: str = "symmetric",
                 stain_normalizer=None, claims: "UnitClaims | None" = None, encode=None):
        self.sample, self.nuclei, self.units = sample, nuclei, list(units)
        # UnitPatches -> {entry key: features}: given, each worker encodes what it cut (CPU: one core each)
        self.encode = encode
        self.chunk_nuclei, self.cuts = chunk_nuclei, tuple(sorted(set(cuts), key=lambda c: c.crop))
        self.tile_size, self.with_mask, self.pad_mode = tile_size, with_mask, pad_mode
        self.stain_normalizer, self.claims = stain_normalizer, claims

    def __iter__(self):
        info = get_worker_info()
        units = contiguous_share(self.units, info.id, info.num_workers) if info else self.units
        reader = TileReader(self.sample, self.tile_size, self.cuts[-1].crop // 2 + 1, self.with_mask,
                            self.pad_mode, self.stain_normalizer)
        for unit in units:
            if self.claims is not None and not self.claims.claim(unit):
                continue  # another process computes (or has computed) it
            rows = self.nuclei.iloc[unit * self.chunk_nuclei: (unit + 1) * self.chunk_nuclei]
            try:
                patches = unit_patches(reader, rows, self.cuts, unit)
                yield UnitFeatures(unit, patches.n_nuclei, self.encode(patches)) if self.encode else patches
            except (DataError, OSError) as error:
                if info is None or not (isinstance(error, DataError) or is_disk_full(error)):
                    raise
                # A worker's exception reaches the main process re-typed as a RuntimeError holding a traceback;
                # handed over as an item, the user gets the same one-line error as without workers (bad input, or a
                # full disk while claiming a unit).
                yield error
                return


PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class DieWithParent:
    """DataLoader `worker_init_fn`: a worker dies with the process that started it.

    Without it, a main process killed by SIGKILL (or the OOM killer) left its workers running for minutes (each with
    a tile and a unit's patches, ~600 MB on a real slide): torch's own check of the parent runs only between units,
    and a worker whose last result is larger than a pipe's buffer blocks for good writing it to the dead parent.
    On Linux the kernel sends the worker SIGKILL when its parent thread ends (the thread that iterates the loader:
    the main thread here); a parent already gone before that was set up is caught by its pid.
    """

    parent_pid: int

    def __call__(self, worker_id: int = 0) -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.parent_pid:
            os._exit(1)


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
