"""The zarr feature cache shared by all stages.

Layout (one zarr v3 group, e.g. ``outputs/features.zarr``)::

    <sample>/nuclei/{cell_id,y,x,area,...}        one row per nucleus, in tile order (the order of every entry)
    <sample>/<encoder>/<patch_size>/features      (n_nuclei, dim) float16, chunked by `chunk_nuclei` rows
    <sample>/<encoder>/<patch_size>/done          (n_units,) uint8, one flag per row chunk ("unit")
    <sample>/<encoder>/<patch_size>/cell_id       (n_nuclei,) int64, the cell_id of each row

A unit is one chunk of rows, so workers (DataLoader workers, torchrun ranks, Dask workers) that own disjoint units
write disjoint zarr chunks and never race. `done` is set only after a unit's features are written, so an interrupted
run resumes from the first unfinished unit. Attributes record what produced an entry; opening it with other settings
raises instead of mixing two encoders' features.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from slidedata.errors import DataError
from slidedata.nuclei import NUCLEI_COLUMNS
from slidedata.patch_size import PatchSize
from slidedata.sample import Sample

NUCLEI_GROUP = "nuclei"
# Attributes that define an entry's content; a mismatch on any of them means different features.
IDENTITY_ATTRS = ("encoder", "weights_sha256", "patch_size", "crop_pixels", "input_size", "interpolation",
                  "sample_microns_per_pixel", "encoder_microns_per_pixel", "mean", "std", "stain_normalization",
                  "use_mask", "dim", "n_nuclei", "chunk_nuclei")


class CacheMismatchError(DataError):
    """An existing cache entry was made with other settings than the ones asked for."""


def tile_order(nuclei: pd.DataFrame, tile_size: int) -> np.ndarray:
    """Row order that groups nuclei by image tile (row-major tiles), so a run of rows needs few tile reads."""
    tile_y = (nuclei["y"].to_numpy() // tile_size).astype(np.int64)
    tile_x = (nuclei["x"].to_numpy() // tile_size).astype(np.int64)
    return np.lexsort((nuclei["x"].to_numpy(), nuclei["y"].to_numpy(), tile_x, tile_y))


@dataclass
class FeatureEntry:
    """One (sample, encoder, patch size) block of features with its per-unit completion flags."""

    group: zarr.Group
    path: Path

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    @property
    def done(self) -> zarr.Array:
        return self.group["done"]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def chunk_nuclei(self) -> int:
        return int(self.group.attrs["chunk_nuclei"])

    @property
    def n_units(self) -> int:
        return int(self.done.shape[0])

    def unit_rows(self, unit: int) -> slice:
        start = unit * self.chunk_nuclei
        return slice(start, min(start + self.chunk_nuclei, self.features.shape[0]))

    def pending_units(self) -> np.ndarray:
        return np.flatnonzero(self.done[:] == 0)

    @property
    def is_complete(self) -> bool:
        return self.n_units == 0 or bool(self.done[:].all())

    def write_unit(self, unit: int, values: np.ndarray) -> None:
        rows = self.unit_rows(unit)
        if values.shape != (rows.stop - rows.start, self.features.shape[1]):
            raise ValueError(f"unit {unit} of {self.path} expects shape "
                             f"{(rows.stop - rows.start, self.features.shape[1])}, got {values.shape}")
        self.features[rows] = values.astype(self.features.dtype)
        self.done[unit] = 1

    def read(self) -> np.ndarray:
        if not self.is_complete:
            missing = len(self.pending_units())
            raise DataError(self.path, "features", f"{missing} of {self.n_units} chunks not computed yet; "
                                                   "run the embed stage (make embed) to finish them")
        return np.asarray(self.features[:], dtype=np.float32)


class FeatureStore:
    """Cached nuclei tables and features, keyed by sample, encoder and patch size."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        _ensure_group(self.root)

    # -- nuclei -------------------------------------------------------------------------------------------------
    def has_nuclei(self, sample_name: str) -> bool:
        return (self.root / sample_name / NUCLEI_GROUP / "zarr.json").exists()

    def nuclei(self, sample: Sample, progress: bool = False) -> pd.DataFrame:
        """The sample's nuclei in tile order; computed from the mask on first use, then read from the cache."""
        if self.has_nuclei(sample.name):
            table = self.read_nuclei(sample.name)
            group = zarr.open_group(self.root / sample.name / NUCLEI_GROUP, mode="r")
            if list(group.attrs["mask_shape"]) != list(sample.shape):
                raise CacheMismatchError(self.root / sample.name / NUCLEI_GROUP, NUCLEI_GROUP,
                                         f"cached for a mask of shape {group.attrs['mask_shape']}, but "
                                         f"{sample.path} has {sample.shape}; use another cache folder")
            sample.set_nuclei(table)
            return table
        tile_size = int(sample.image.chunks[1][0])
        table = sample.nuclei(progress=progress)
        table = table.iloc[tile_order(table, tile_size)].reset_index(drop=True)
        attrs = {"tile_size": tile_size, "mask_shape": list(sample.shape), "source": str(sample.path.resolve()),
                 "n_nuclei": len(table)}
        self._write_nuclei(sample.name, table, attrs)
        sample.set_nuclei(table)
        return table

    def read_nuclei(self, sample_name: str) -> pd.DataFrame:
        path = self.root / sample_name / NUCLEI_GROUP
        if not self.has_nuclei(sample_name):
            raise DataError(path, NUCLEI_GROUP, "no nuclei table cached for this sample; run the embed stage first")
        group = zarr.open_group(path, mode="r")
        return pd.DataFrame({name: group[name][:] for name in NUCLEI_COLUMNS})

    def tile_size(self, sample_name: str) -> int:
        return int(zarr.open_group(self.root / sample_name / NUCLEI_GROUP, mode="r").attrs["tile_size"])

    def _write_nuclei(self, sample_name: str, table: pd.DataFrame, attrs: dict) -> None:
        def build(group: zarr.Group) -> None:
            for name in NUCLEI_COLUMNS:
                values = table[name].to_numpy()
                group.create_array(name, data=values, chunks=(max(len(values), 1),))
            group.attrs.update(attrs)

        _publish_group(self.root / sample_name / NUCLEI_GROUP, build)

    # -- features -----------------------------------------------------------------------------------------------
    def entry_path(self, sample_name: str, encoder: str, patch_size: str | int) -> Path:
        return self.root / sample_name / encoder / PatchSize.parse(patch_size).key

    def open_entry(self, sample_name: str, encoder: str, patch_size: str | int) -> FeatureEntry:
        path = self.entry_path(sample_name, encoder, patch_size)
        if not (path / "zarr.json").exists():
            raise DataError(path, "features", f"no cached features for sample '{sample_name}', encoder '{encoder}', "
                                              f"patch size {patch_size}; run the embed stage (make embed) first")
        return FeatureEntry(zarr.open_group(path, mode="r+"), path)

    def create_entry(self, sample_name: str, attrs: dict) -> FeatureEntry:
        """Open the entry for `attrs` (encoder, patch_size, dim, n_nuclei, chunk_nuclei, ...), creating it if new.

        The entry stores the cell_ids of its rows beside the features, so it can be read without the nuclei table.
        """
        path = self.entry_path(sample_name, attrs["encoder"], attrs["patch_size"])
        if not (path / "zarr.json").exists():
            cell_ids = self.read_nuclei(sample_name)["cell_id"].to_numpy(np.int64)
            n, dim, chunk = int(attrs["n_nuclei"]), int(attrs["dim"]), int(attrs["chunk_nuclei"])

            def build(group: zarr.Group) -> None:
                group.create_array("features", shape=(n, dim), chunks=(chunk, dim), dtype="float16",
                                   fill_value=np.nan)
                group.create_array("done", shape=(-(-n // chunk),), chunks=(1,), dtype="uint8", fill_value=0)
                group.create_array("cell_id", data=cell_ids, chunks=(chunk,))
                group.attrs.update(attrs)

            _publish_group(path, build)
        entry = FeatureEntry(zarr.open_group(path, mode="r+"), path)
        self._check_identity(entry, attrs)
        return entry

    def read_features(self, sample_name: str, encoder: str, patch_size: str | int) -> np.ndarray:
        return self.open_entry(sample_name, encoder, patch_size).read()

    def entries(self) -> pd.DataFrame:
        """Every cached entry with its completion, for `python -m embed --list`."""
        rows = []
        for zjson in sorted(self.root.glob("*/*/*/features/zarr.json")):
            path = zjson.parent.parent
            if path.name.startswith("."):  # a temporary group still being built
                continue
            entry = FeatureEntry(zarr.open_group(path, mode="r"), path)
            done = entry.done[:]
            rows.append({"sample": path.parent.parent.name, "encoder": path.parent.name,
                         "patch_size": path.name, "n_nuclei": entry.features.shape[0],
                         "dim": entry.features.shape[1], "units_done": int(done.sum()), "units": len(done)})
        return pd.DataFrame(rows, columns=["sample", "encoder", "patch_size", "n_nuclei", "dim", "units_done", "units"])

    @staticmethod
    def _check_identity(entry: FeatureEntry, attrs: dict) -> None:
        stored = entry.attrs
        for key in IDENTITY_ATTRS:
            if key in attrs and key in stored and _normalise(stored[key]) != _normalise(attrs[key]):
                raise CacheMismatchError(entry.path, key, f"cached with {key}={stored[key]!r}, now asked for "
                                                          f"{attrs[key]!r}; refusing to mix them. Use another "
                                                          "--cache folder or delete this entry")


def _publish_group(final: Path, build) -> None:
    """Build a group under a private temporary name, then rename it into place, so that no reader (another worker,
    a later run after a crash) ever sees it half-written. If another worker published it first, keep theirs."""
    _ensure_group(final.parent)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(zarr.open_group(tmp, mode="w"))
    try:
        tmp.rename(final)
    except OSError:  # the other worker's group is identical in content
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "zarr.json").exists():
            raise


def _ensure_group(path: Path) -> zarr.Group:
    """Open or create a group; tolerant of another process creating it at the same moment."""
    for attempt in range(5):
        try:
            return zarr.open_group(path, mode="a")
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) if isinstance(v, float) else v for v in value]
    return value
