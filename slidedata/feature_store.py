"""The zarr feature cache shared by all stages.

Layout (one zarr v3 group, e.g. ``outputs/features.zarr``)::

    <sample>/nuclei/{cell_id,y,x,area,...}        one row per nucleus, in tile order (the order of every entry)
    <sample>/<encoder>/<patch_size>/features      (n_nuclei, dim) float16, chunked by `chunk_nuclei` rows
    <sample>/<encoder>/<patch_size>/done          (n_units,) uint8, one flag per row chunk ("unit")
    <sample>/<encoder>/<patch_size>/cell_id       (n_nuclei,) int64, the cell_id of each row

A unit is one chunk of rows, so workers (DataLoader workers, torchrun ranks, Dask workers) that own disjoint units
write disjoint zarr chunks and never race. `done` is set only after a unit's features are written, so an interrupted
run resumes from the first unfinished unit. Attributes record what produced an entry (its identity) and the names of
the keys that form it (`identity_keys`, and of those the per-sample ones, `sample_keys`), as decided by whoever
creates the entry (`embed.pipeline.entry_attrs`); opening it with other settings raises instead of mixing two
encoders' features; a sample whose image or mask files changed (`input_digest`) has its nuclei table and entries
recomputed by the embed stage, and is refused by the stages that do not embed (fit, submit, infer).

Beside the cache (not inside it, where zarr would warn about a folder that is no part of its hierarchy),
`.<cache name>.locks/<sample>/...` holds the lock files that let several embed processes share units; only the embed
stage takes them, so the stages that read a finished cache need no write access to it.
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

from slidedata import locks
from slidedata.errors import DataError
from slidedata.nuclei import GEOMETRY_VERSION, NUCLEI_COLUMNS
from slidedata.patch_size import PatchSize
from slidedata.publish import publishing_folder, sample_holding
from slidedata.sample import Sample
from slidedata.tiles import DEFAULT_MAX_TILE, tile_edge, tile_index

NUCLEI_GROUP = "nuclei"
# Each entry records which of its attributes form its identity (what its numbers depend on: a difference in any of
# them means other features) and which of those describe the sample rather than the settings (they differ between
# the samples of one model). The creator decides both; every check below reads them from the entry, so there is no
# second list here to keep in step with it.
IDENTITY_KEYS = "identity_keys"
SAMPLE_KEYS = "sample_keys"
_OLDER_VERSION = ("made by an older version that did not record its identity keys, so it cannot be checked; embed "
                  "again with this version (another --cache folder, or delete this entry)")


class CacheMismatchError(DataError):
    """An existing cache entry was made with other settings than the ones asked for."""


def entry_key(encoder: str, patch_size: PatchSize | str | int) -> str:
    """'encoder:patch_size', how an entry is named in settings records (a model's `feature_settings`)."""
    return f"{encoder}:{PatchSize.parse(patch_size).key}"


def parse_entry_key(key: str) -> tuple[str, PatchSize]:
    encoder, size = key.rsplit(":", 1)
    return encoder, PatchSize.parse(size)


def identity_attrs(settings: dict, sample: dict) -> dict:
    """The attributes of a new entry: its identity, split into the embedding `settings` and the values that describe
    the `sample`, with the names of both recorded (`identity_keys`, `sample_keys`)."""
    if set(settings) & set(sample):
        raise ValueError(f"keys both settings and per-sample: {sorted(set(settings) & set(sample))}")
    return {**settings, **sample, IDENTITY_KEYS: sorted({**settings, **sample}), SAMPLE_KEYS: sorted(sample)}


def recorded_keys(attrs: dict, where: str | Path = "-") -> tuple[list[str], list[str]]:
    """(identity keys, per-sample keys) as an entry's attributes record them; an entry recording none is refused:
    a key it cannot name is a difference too, never assumed to match."""
    if IDENTITY_KEYS not in attrs or SAMPLE_KEYS not in attrs:
        raise CacheMismatchError(where, IDENTITY_KEYS, _OLDER_VERSION)
    return list(attrs[IDENTITY_KEYS]), list(attrs[SAMPLE_KEYS])


def settings_of(attrs: dict, where: str | Path = "-") -> dict:
    """The embedding settings of an entry's attributes: its recorded identity without its per-sample keys."""
    identity, per_sample = recorded_keys(attrs, where)
    return {key: _normalise(attrs.get(key)) for key in identity if key not in per_sample}


def settings_differences(expected: dict, found: dict) -> list[str]:
    """'key: expected X, found Y' for every setting that differs (keys missing on one side count as None)."""
    return [f"{key}: expected {expected.get(key)!r}, found {found.get(key)!r}"
            for key in sorted(set(expected) | set(found)) if _normalise(expected.get(key)) != _normalise(found.get(key))]


def tile_order(nuclei: pd.DataFrame, tile_size: int) -> np.ndarray:
    """Row order that groups nuclei by image tile (row-major tiles), so a run of rows needs few tile reads."""
    tile_y, tile_x = tile_index(nuclei["y"].to_numpy(), tile_size), tile_index(nuclei["x"].to_numpy(), tile_size)
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
    def settings(self) -> dict:
        """Its embedding settings (`settings_of`); refused if it records no identity keys."""
        return settings_of(self.attrs, self.path)

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

    def cell_ids(self) -> np.ndarray:
        """The cell_id (mask value) of each row."""
        return np.asarray(self.group["cell_id"][:], dtype=np.int64)

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

    def __init__(self, root: str | Path, create: bool = True):
        """`create=False` (the stages that do not embed): a missing cache is a DataError, and nothing is created."""
        self.root = Path(root)
        sample = sample_holding(self.root)
        if sample is not None:
            raise DataError(self.root, "-", f"is the sample zarr {sample}, or inside it, not a feature cache: give the "
                                            "--cache that the embed stage writes (e.g. outputs/features.zarr)")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            _ensure_group(self.root)
        elif not (self.root / "zarr.json").is_file():
            problem = ("no feature cache here" if not self.root.exists() else
                       "not a feature cache (no zarr.json in it)" if self.root.is_dir() else
                       "a file, not a feature cache folder")
            raise DataError(self.root, "-", f"{problem}; run the embed stage first (make embed), or pass the "
                                            "--cache it wrote")

    @property
    def locks(self) -> Path:
        """The folder of the embed stage's lock files, beside the cache."""
        root = self.root.absolute()
        return root.with_name(f".{root.name}.locks")

    # -- nuclei -------------------------------------------------------------------------------------------------
    def has_nuclei(self, sample_name: str) -> bool:
        return (self.root / sample_name / NUCLEI_GROUP / "zarr.json").exists()

    def nuclei(self, sample: Sample, progress: bool = False, if_changed: str = "recompute",
               max_tile: int = DEFAULT_MAX_TILE) -> pd.DataFrame:
        """The sample's nuclei in tile order; computed from the mask on first use, then read from the cache.

        A cached table made from other image or mask files (their digest differs, or was not recorded), or by other
        geometry code (`GEOMETRY_VERSION`), is stale, and so is every entry of the sample (their rows and the nucleus
        shape features are the table's): `if_changed="recompute"` (the embed stage) deletes them and starts again,
        `"raise"` (the stages that only read; they take no lock) stops with a DataError that says to embed (again),
        also where no table is cached yet. The tiles of the order (recorded as `tile_size`) follow the image's
        storage chunks, capped at `max_tile` (see slidedata.tiles).
        """
        digest = sample.input_digest()
        if if_changed != "recompute":  # a reader takes no lock: a finished cache may sit on a read-only mount
            return self._cached_nuclei(sample, digest, stale_raises=True)
        with locks.hold(self.locks / sample.name / "nuclei.lock"):  # one process invalidates and computes
            table = self._cached_nuclei(sample, digest, stale_raises=False)
            if table is not None:
                return table
            if self.has_nuclei(sample.name):
                self._discard_sample(sample.name)
            return self.write_nuclei(sample, sample.nuclei(progress=progress),
                                     tile_edge(int(sample.image.chunks[1][0]), max_tile))

    def _cached_nuclei(self, sample: Sample, digest: str, stale_raises: bool) -> pd.DataFrame | None:
        """The cached table where it is current; None where it is missing or stale, or, with `stale_raises`, a
        DataError that says to embed (again)."""
        if not self.has_nuclei(sample.name):
            if stale_raises:
                raise DataError(sample.path, "-", f"not embedded into {self.root} yet (no nuclei table); run the "
                                                  "embed stage first (make embed)")
            return None
        stored = zarr.open_group(self.root / sample.name / NUCLEI_GROUP, mode="r").attrs
        same_data, same_geometry = (stored.get("input_digest") == digest,
                                    stored.get("geometry_version") == GEOMETRY_VERSION)
        if same_data and same_geometry:
            table = self.read_nuclei(sample.name)
            sample.set_nuclei(table)
            return table
        if not stale_raises:
            return None
        if not same_data:
            stale = ("the image or mask files differ from those this sample was embedded from into "
                     f"{self.root} (changed data, or a cache of an older version)")
        else:
            stale = (f"its nuclei table in {self.root} was computed by another version (geometry "
                     f"{stored.get('geometry_version')!r}, this version {GEOMETRY_VERSION!r})")
        raise DataError(sample.path, "-", f"{stale}; run the embed stage again (make embed)")

    def write_nuclei(self, sample: Sample, table: pd.DataFrame, tile_size: int | None = None) -> pd.DataFrame:
        """Cache `table` (NUCLEI_COLUMNS, one row per nucleus of the sample's mask) as the sample's nuclei, in tile
        order (tiles of `tile_size`, default the image's chunk edge capped as `nuclei` caps it), stamped with the
        sample's input digest. `nuclei` calls it with the table read from the mask; a synthetic benchmark cache calls
        it with its own."""
        tile_size = int(tile_size or tile_edge(int(sample.image.chunks[1][0])))
        table = table.iloc[tile_order(table, tile_size)].reset_index(drop=True)
        attrs = {"tile_size": tile_size, "n_nuclei": len(table), "input_digest": sample.input_digest(),
                 "geometry_version": GEOMETRY_VERSION}
        self._write_nuclei(sample.name, table, attrs)
        sample.set_nuclei(table)
        return table

    def _discard_sample(self, sample_name: str) -> None:
        """Remove a sample's nuclei table and entries: move them aside in one rename (readers never see half a
        sample), then delete."""
        aside = self.root / f".{sample_name}.stale{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        (self.root / sample_name).rename(aside)
        shutil.rmtree(aside, ignore_errors=True)

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
    def entry_path(self, sample_name: str, encoder: str, patch_size: PatchSize | str | int) -> Path:
        return self.root / sample_name / encoder / PatchSize.parse(patch_size).key

    def open_entry(self, sample_name: str, encoder: str, patch_size: PatchSize | str | int) -> FeatureEntry:
        path = self.entry_path(sample_name, encoder, patch_size)
        if not (path / "zarr.json").exists():
            raise DataError(path, "features", f"no cached features for sample '{sample_name}', encoder '{encoder}', "
                                              f"patch size {patch_size}; run the embed stage (make embed) first")
        return FeatureEntry(zarr.open_group(path, mode="r+"), path)

    def create_entry(self, sample_name: str, attrs: dict) -> FeatureEntry:
        """Open the entry for `attrs` (encoder, patch_size, dim, n_nuclei, chunk_nuclei, ... and the names of its
        identity keys: see `identity_attrs`), creating it if new; an existing one must have the same identity.

        The entry stores the cell_ids of its rows beside the features, so it can be read without the nuclei table.
        """
        identity, per_sample = set(attrs.get(IDENTITY_KEYS, ())), set(attrs.get(SAMPLE_KEYS, ()))
        if SAMPLE_KEYS not in attrs or not per_sample | {"encoder", "patch_size"} <= identity <= set(attrs):
            raise ValueError(f"entry attributes must name their identity keys (identity_attrs), encoder and patch_size "
                             f"among them, and hold every key they name: {sorted(attrs)}")
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

    def read_features(self, sample_name: str, encoder: str, patch_size: PatchSize | str | int) -> np.ndarray:
        return self.open_entry(sample_name, encoder, patch_size).read()

    def settings(self, sample_name: str, keys) -> dict[str, dict]:
        """Embedding settings of the entries `keys` ((encoder, patch size) pairs), by 'encoder:patch_size'."""
        return {entry_key(encoder, size): self.open_entry(sample_name, encoder, size).settings
                for encoder, size in keys}

    def check_settings(self, sample_name: str, expected: dict[str, dict], than: str = "the model was trained on",
                       remedy: str = "embed this sample with the model's settings") -> None:
        """Refuse the sample's entries if any was made with other settings than `expected` (from `settings`);
        `than` and `remedy` say whose settings those are and what to do."""
        for key, wanted in expected.items():
            encoder, size = parse_entry_key(key)
            entry = self.open_entry(sample_name, encoder, size)
            differences = settings_differences(wanted, entry.settings)
            if differences:
                raise CacheMismatchError(entry.path, "features", f"made with other settings than {than} "
                                                                 f"({'; '.join(differences)}); {remedy}")

    def unit_lock(self, sample_name: str, encoder: str, unit: int) -> Path:
        """The lock file of one unit (all patch sizes of the encoder): held while a process computes it."""
        return self.locks / sample_name / encoder / f"unit-{int(unit)}.lock"

    def entries(self) -> pd.DataFrame:
        """Every cached entry with its completion, for `python -m embed --list`."""
        rows = []
        for zjson in self.root.glob("*/*/*/features/zarr.json"):
            path = zjson.parent.parent
            if path.name.startswith("."):  # a temporary group still being built
                continue
            entry = FeatureEntry(zarr.open_group(path, mode="r"), path)
            done = entry.done[:]
            rows.append({"sample": path.parent.parent.name, "encoder": path.parent.name,
                         "patch_size": path.name, "n_nuclei": entry.features.shape[0],
                         "dim": entry.features.shape[1], "units_done": int(done.sum()), "units": len(done)})
        # Sizes in order of their numbers, those in pixels before those in microns (not as text: 128 < 32).
        rows.sort(key=lambda r: (r["sample"], r["encoder"], *_size_order(r["patch_size"])))
        return pd.DataFrame(rows, columns=["sample", "encoder", "patch_size", "n_nuclei", "dim", "units_done", "units"])

    def recorded_pixel_size(self, sample_name: str) -> float | None:
        """The pixel size the sample's entries were embedded with (given then, where the sample stores none); None
        where no entry of the sample records one."""
        for zjson in sorted((self.root / sample_name).glob("*/*/zarr.json")):
            if zjson.parent.name.startswith(".") or zjson.parent.parent.name == NUCLEI_GROUP:
                continue
            size = zarr.open_group(zjson.parent, mode="r").attrs.get("sample_microns_per_pixel")
            if size is not None:
                return float(size)
        return None

    @staticmethod
    def _check_identity(entry: FeatureEntry, attrs: dict) -> None:
        """Refuse `entry` unless it records the identity keys `attrs` records, split alike, with the same values."""
        stored = entry.attrs
        # Other keys are another version's entry: a key one side does not name never counts as matching.
        for names, cached in zip((IDENTITY_KEYS, SAMPLE_KEYS), recorded_keys(stored, entry.path)):
            cached, asked = set(cached), set(attrs[names])
            if cached != asked:
                only_cached = [f"{k}={stored.get(k)!r}" for k in sorted(cached - asked)]
                only_now = [f"{k}={attrs.get(k)!r}" for k in sorted(asked - cached)]
                raise CacheMismatchError(entry.path, names, f"cached with {names} that differ from this request's "
                                                            f"(only cached: {only_cached}; only now: {only_now}); "
                                                            "refusing to mix them. Use another --cache folder or "
                                                            "delete this entry")
        for key in attrs[IDENTITY_KEYS]:
            if _normalise(stored.get(key)) != _normalise(attrs.get(key)):
                raise CacheMismatchError(entry.path, key, f"cached with {key}={stored.get(key)!r}, now asked for "
                                                          f"{attrs.get(key)!r}; refusing to mix them. Use another "
                                                          "--cache folder or delete this entry")


def _publish_group(final: Path, build) -> None:
    """Build a group under a private temporary name, then rename it into place, so that no reader (another worker,
    a later run after a crash) ever sees it half-written. If another worker published it first, keep theirs (the
    same content: both built it from the same inputs)."""
    _ensure_group(final.parent)
    with publishing_folder(final, keep_existing=True) as tmp:
        build(zarr.open_group(tmp, mode="w"))
    if not (final / "zarr.json").exists():
        raise DataError(final, "-", "a folder that is not a zarr group is in the way; delete it")


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


def _size_order(key: str) -> tuple:
    """Sort key of an entry folder's name: (0 px | 1 um, value); a name that is no size goes last, as text."""
    try:
        size = PatchSize.parse(key)
    except ValueError:
        return (2, 0.0, key)
    return (0 if size.unit == "px" else 1, size.value, key)


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) if isinstance(v, float) else v for v in value]
    return value
