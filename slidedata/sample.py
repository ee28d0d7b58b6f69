"""Open one Crunch-format sample (a SpatialData zarr) and check it is what the pipeline expects.

Every stage reads samples through this module only, so the format's quirks (the mask is an *image* element, ids are
not contiguous, held-out nuclei are absent from the expression table) are handled in one place.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd

from slidedata.chunks import ChunkFiles, describe_chunk, digest_files
from slidedata.errors import DataError
from slidedata.publish import is_zarr_group
from slidedata.tables import SampleTables

log = logging.getLogger(__name__)

IMAGE = "HE_original"
MASK = "HE_nuc_original"
EXPRESSION = "anucleus"
GROUPS = "cell_id-group"
# The challenge's panel (10x Xenium, Crunch 1): the demo's default and the spot importer's default panel size. Nothing
# requires it: a sample's panel is whatever its `anucleus` holds.
CHALLENGE_N_GENES = 460
GROUP_NAMES = ("train", "validation", "test")
HELD_OUT_GROUPS = ("validation", "test")
SAMPLE_SUFFIX = ".zarr"
MICRONS = "microns"  # coordinate system whose scale transformation of HE_original gives the pixel size
SCALE_FACTOR = 100  # X = log1p(counts / total * SCALE_FACTOR): the challenge's normalisation
MAX_LOG_EXPRESSION = float(np.log1p(SCALE_FACTOR))  # a cell's whole total in one gene: the most X can hold
EXPRESSION_ATOL = 1e-3  # X may be stored rounded or as float16; the normalisation itself is exact
# A given pixel size may differ this much (relative) from a stored one: rounding (0.688 for 0.6875), not another
# scan. Beyond it the given value would silently rescale every patch size in microns (5 for 0.6875: a 12 um crop
# becomes 2 px), so it is refused unless forced.
PIXEL_SIZE_RTOL = 0.01
ROWS_CHECKED = 2000  # rows of X compared with layers['counts'] (evenly spaced): bounded cost on any table
# Where cell ids are not the mask's values (strings, as Xenium's 'aaaadnje-1'), this obs column holds each cell's value
# in the mask: 10x's own name for it (nucleus_boundaries.parquet), and what `importers.xenium` writes.
LABEL_COLUMN = "label_id"
# What spatialdata reads of a sample: the raster and shapes elements, lazily. The tables are read part by part
# (`slidedata.tables`): spatialdata would load each whole, every layer with it.
_ELEMENTS_READ_WHOLE = ("images", "labels", "shapes")


@dataclass(frozen=True)
class Elements:
    """Which elements of a SpatialData zarr hold a sample's parts: the challenge's names by default, so that data
    laid out otherwise (spatialdata-io's Xenium reader: an aligned `he_image`, `nucleus_boundaries`, `table`) is
    read without a converter.

    `nuclei` is an integer mask (an image or labels element, pixel = the cell's value) or nucleus polygons (a shapes
    element, rasterised once into a cached mask: `slidedata.polygons`). `groups` may be the expression table itself
    (a column `group_column`); its 'test' rows are then left out of the expression, as the challenge leaves them
    out of `anucleus` (its 'validation' rows, measured, score the models). Cell ids (`cell_id`, in both tables) are
    the mask's values where they are integers; other ids (strings) are mapped to the mask through the polygons'
    ids, or through the integer obs column `label_column`, and written back as given in every output.
    """

    image: str = IMAGE
    nuclei: str = MASK
    table: str = EXPRESSION
    groups: str = GROUPS
    group_column: str = "group"
    cell_id: str = "cell_id"
    label_column: str = LABEL_COLUMN

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"element name {name} must be a non-empty string, got {value!r}")


DEFAULT_ELEMENTS = Elements()


@dataclass
class Sample:
    """A lazily loaded sample: the image and mask stay on disk as dask arrays; the tables are small and in memory."""

    name: str
    path: Path
    image: da.Array  # (3, H, W) uint8
    mask: da.Array  # (H, W) integer, pixel value = cell_id, 0 = background
    groups: pd.Series  # cell_id (int64 index) -> 'train' | 'validation' | 'test'
    expression: ad.AnnData | None  # rows indexed by obs['cell_id']; None where the sample has no measurements
    microns_per_pixel: float | None = None  # stored with the sample or given by the user; None where unknown
    image_files: ChunkFiles | None = field(default=None, repr=False)  # None where not a local zarr v2/v3 array
    mask_files: ChunkFiles | None = field(default=None, repr=False)
    elements: Elements = DEFAULT_ELEMENTS
    # The cell ids as the data gives them (e.g. Xenium's strings), indexed by the mask's value; None where the ids
    # are the mask's values themselves. Inside, every table is indexed by the mask's values.
    id_names: pd.Series | None = field(default=None, repr=False)
    _nuclei: pd.DataFrame | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def has_expression(self) -> bool:
        return self.expression is not None and self.expression.n_obs > 0

    @property
    def genes(self) -> list[str]:
        if self.expression is None:
            return []
        return [str(g) for g in self.expression.var_names]

    def nuclei(self, progress: bool = False) -> pd.DataFrame:
        """Per-nucleus geometry from the mask (one streaming pass, computed once per Sample object)."""
        if self._nuclei is None:
            from slidedata.nuclei import BadCellIds, nuclei_from_mask

            try:
                table = nuclei_from_mask(self.mask, progress=progress, desc=f"{self.name}: nuclei")
            except BadCellIds as exc:
                raise DataError(self.path, self.elements.nuclei, str(exc)) from exc
            except Exception as exc:
                error = self._read_error(self.elements.nuclei, self.mask, None)
                if error is None:
                    raise
                raise error from exc
            self._check_tables_against_mask(table)
            self._check_missing_mask_chunks(table)
            self._nuclei = table
        return self._nuclei

    def input_digest(self) -> str:
        """sha256 of the image's and the mask's files (metadata and chunks): what every feature is computed from.
        One sequential read of the compressed files, once per Sample object."""
        if self._digest is None:
            arrays = [f for f in (self.image_files, self.mask_files) if f is not None]
            if len(arrays) < 2:  # not a local zarr: hash the decoded arrays instead (slower, always correct)
                self._digest = _array_digest([self.image, self.mask])
            else:
                self._digest = digest_files(arrays)
        return self._digest

    def set_nuclei(self, table: pd.DataFrame) -> None:
        """Reuse a nuclei table computed earlier (e.g. read from the feature cache) instead of re-reading the mask."""
        self._nuclei = table

    def expression_of(self, cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Measured log1p expression for `cell_ids`: (matrix with NaN rows where unmeasured, boolean 'measured')."""
        cell_ids = np.asarray(cell_ids, dtype=np.int64)
        n_genes = len(self.genes)
        out = np.full((len(cell_ids), n_genes), np.nan, dtype=np.float32)
        if not self.has_expression:
            return out, np.zeros(len(cell_ids), dtype=bool)
        row_of = pd.Index(self.expression.obs["cell_id"].to_numpy(np.int64))
        rows = row_of.get_indexer(cell_ids)
        measured = rows >= 0
        out[measured] = dense(self.expression.X[rows[measured]])
        return out, measured

    def names_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """The ids as the data gives them for the mask values `cell_ids`: what every output writes."""
        cell_ids = np.asarray(cell_ids, dtype=np.int64)
        if self.id_names is None:
            return cell_ids
        return self.id_names.reindex(cell_ids).to_numpy(dtype=object)

    def group_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """Group name per cell_id; 'unassigned' where the group table does not list the nucleus."""
        return self.groups.reindex(np.asarray(cell_ids, dtype=np.int64)).fillna("unassigned").to_numpy(dtype=object)

    def read_image(self, y0: int, y1: int, x0: int, x1: int, pad_mode: str = "symmetric") -> np.ndarray:
        """Image window [y0, y1) x [x0, x1) as (3, h, w) uint8; the part outside the slide is padded."""
        return self._read(self.elements.image, self.image, y0, y1, x0, x1, pad_mode, constant=255)

    def read_mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Mask window as (h, w); outside the slide is background (0)."""
        return self._read(self.elements.nuclei, self.mask[None], y0, y1, x0, x1, "constant", constant=0)[0]

    def _read(self, element: str, array: da.Array, y0: int, y1: int, x0: int, x1: int, pad_mode: str,
              constant: int) -> np.ndarray:
        try:
            return _read_padded(array, y0, y1, x0, x1, pad_mode, constant)
        except Exception as exc:
            window = (slice(max(y0, 0), max(min(y1, array.shape[-2]), 0)),
                      slice(max(x0, 0), max(min(x1, array.shape[-1]), 0)))
            error = self._read_error(element, array, window)
            if error is None:
                raise
            raise error from exc

    def _read_error(self, element: str, array: da.Array, window: tuple[slice, slice] | None) -> DataError | None:
        """A DataError naming the chunk that cannot be decoded, found by reading the window's chunks one by one;
        None where every chunk reads (then the failure is a bug, not damaged data, and keeps its traceback)."""
        bad = _undecodable_block(array, window)
        if bad is None:
            return None
        files = self.image_files if element == self.elements.image else self.mask_files
        block, error = bad
        where = _block_description(array, block, files)
        return DataError(self.path, element, f"{where} cannot be read ({type(error).__name__}: {error}); the file "
                                             "is damaged or truncated: copy the sample again")

    def _check_missing_mask_chunks(self, nuclei: pd.DataFrame) -> None:
        """zarr leaves out mask chunks that are all background, so a missing mask chunk is only wrong if nuclei were
        cut off by it (a partial copy). A nucleus can also end exactly at the chunk's edge, touching it in its
        outermost row: a few pixels of a rounded outline. A cut one meets the edge with a chord, most of its width
        (`looks_cut`). Bounding boxes only preselect; the pixels along the chunk decide."""
        if self.mask_files is None:
            return
        extent = nuclei.set_index("cell_id")
        width, height = extent["x_max"] - extent["x_min"] + 1, extent["y_max"] - extent["y_min"] + 1
        for index in self.mask_files.missing():
            ys, xs = self.mask_files.region(index)[-2:]
            near = ((nuclei["y_max"] >= ys.start - 1) & (nuclei["y_min"] <= ys.stop)
                    & (nuclei["x_max"] >= xs.start - 1) & (nuclei["x_min"] <= xs.stop))
            if not near.any():
                continue
            ring = self.read_mask(ys.start - 1, ys.stop + 1, xs.start - 1, xs.stop + 1)
            sides = ((ring[0, 1:-1], width), (ring[-1, 1:-1], width),  # above and below the chunk
                     (ring[1:-1, 0], height), (ring[1:-1, -1], height))  # left and right of it
            cut = sorted({int(c) for line, size in sides for c in looks_cut(line, size)})
            if cut:
                first = self.names_of(np.array(cut[:1]))[0]
                raise DataError(self.path, self.elements.nuclei,
                                f"{describe_chunk(self.mask_files, index)} is missing, but {len(cut)} nucleus/nuclei "
                                f"end at its edge as if cut off there (e.g. cell_id {first}): a partial copy of the "
                                "sample? Copy it again")

    def _check_tables_against_mask(self, nuclei: pd.DataFrame) -> None:
        in_mask = pd.Index(nuclei["cell_id"].to_numpy())
        tables = [(self.elements.groups, self.groups.index.to_numpy())]
        if self.has_expression:
            tables.append((self.elements.table, self.expression.obs["cell_id"].to_numpy(np.int64)))
        for element, ids in tables:
            missing = ids[~pd.Index(ids).isin(in_mask)]
            if len(missing):
                raise DataError(
                    self.path, element,
                    f"{len(missing)} cell_id(s) are not in the mask {self.elements.nuclei}, e.g. "
                    f"{self.names_of(missing[:5]).tolist()}",
                )
        unlisted = ~in_mask.isin(self.groups.index)
        if unlisted.any():
            log.warning("%s: %d nuclei of the mask have no row in %s; they get no prediction",
                        self.path, int(unlisted.sum()), self.elements.groups)


# A nucleus meeting a missing chunk's edge along at least this share of its extent (and MIN_CUT_CONTACT pixels) was
# cut there. A disk's outermost raster row spans well under half its width; the demo's small blocky nuclei, ending
# exactly at an empty 16 px chunk, reached 0.56. A cut 15% of a disk's diameter deep spans 0.7, one through its
# middle all of it: a missing chunk inside tissue cuts many nuclei, and some of them that deep.
CUT_CONTACT_SHARE = 0.7
MIN_CUT_CONTACT = 3


def looks_cut(line: np.ndarray, size_of: pd.Series) -> np.ndarray:
    """The ids in `line` (the mask's pixels along one edge of a missing chunk) whose pixels there span at least
    CUT_CONTACT_SHARE of their size across the edge (`size_of`: id -> extent along the edge) and MIN_CUT_CONTACT
    pixels."""
    ids, contact = np.unique(line[line > 0], return_counts=True)
    if not len(ids):
        return ids
    size = size_of.reindex(ids.astype(np.int64)).to_numpy(np.float64)
    return ids[(contact >= MIN_CUT_CONTACT) & (contact >= CUT_CONTACT_SHARE * np.nan_to_num(size, nan=0.0))]


def open_sample(path: str | Path, n_genes: int | None = None, microns_per_pixel: float | None = None,
                force_microns_per_pixel: bool = False, elements: Elements | None = None) -> Sample:
    """Open and validate one sample zarr. Its gene panel is the one its expression table holds, of any size;
    `n_genes` demands a panel of exactly that many genes (a DataError naming the file otherwise).

    The pixel size is the one stored with the sample (a 'microns' coordinate system); `microns_per_pixel` gives it
    for samples that store none. A given size that disagrees with a stored one is refused (DataError naming both)
    unless `force_microns_per_pixel`, which makes the given one win. `elements`: where the image, nuclei and tables
    are (default: the challenge's names; see `Elements`).
    """
    import spatialdata as sd

    elements = elements or DEFAULT_ELEMENTS
    path = Path(path)
    if not path.exists():
        raise DataError(path, "-", "no such file or folder")
    try:
        with warnings.catch_warnings(), _quiet("ome_zarr.reader"):
            warnings.simplefilter("ignore")
            sdata = sd.read_zarr(path, selection=_ELEMENTS_READ_WHOLE)
    except Exception as exc:  # the reader raises many types; the user needs the file name
        raise DataError(path, "-", f"not a readable SpatialData zarr ({type(exc).__name__}: {exc})") from exc
    tables = SampleTables(path)

    image_element = _element(sdata, tables, path, elements.image, ("images",))
    image = _image_element(image_element, path, elements.image)
    polygon_ids = None
    if elements.nuclei in sdata.shapes:
        from slidedata.polygons import rasterised_mask

        mask, mask_files, polygon_ids = rasterised_mask(sdata, path, elements.nuclei, image_element, image,
                                                        _sample_name(path), elements.cell_id)
    else:
        mask = _mask_element(sdata, tables, path, elements.nuclei)
        mask_files = next((f for f in (ChunkFiles.find(path / kind / elements.nuclei) for kind in ("images", "labels"))
                           if f), None)
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise DataError(path, elements.nuclei, f"mask shape {tuple(mask.shape)} differs from {elements.image} shape "
                                               f"{tuple(image.shape[1:])}")
    image_files = ChunkFiles.find(path / "images" / elements.image)
    _check_missing_image_chunks(path, image_files, mask_files, elements.image)
    ids = _CellIds(path, elements, polygon_ids)
    groups = _groups(tables, sdata, path, elements, ids)
    expression = _expression(tables, path, n_genes, elements, ids)
    if microns_per_pixel is not None and not microns_per_pixel > 0:
        raise DataError(path, elements.image, f"microns per pixel must be positive, got {microns_per_pixel}")
    forced = force_microns_per_pixel and microns_per_pixel is not None  # a forced size needs no stored one
    stored = None if forced else _stored_microns_per_pixel(image_element, path, elements.image)
    microns_per_pixel = choose_pixel_size(microns_per_pixel, stored, force_microns_per_pixel, path, elements.image,
                                          "stored with the sample")
    return Sample(name=_sample_name(path), path=path, image=image, mask=mask, groups=groups, expression=expression,
                  microns_per_pixel=microns_per_pixel, image_files=image_files, mask_files=mask_files,
                  elements=elements, id_names=ids.names())


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence a library's warnings while it reads: ome_zarr says 'no parent found' for every labels element that
    spatialdata keeps beside its image (its own layout), on stderr between the stages' lines."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)


class _CellIds:
    """Cell ids as a table gives them -> the mask's values, and back (`names`).

    Integer ids are the mask's values. Other ids (strings) are looked up among the nucleus polygons' ids (their
    mask value is their position + 1, `slidedata.polygons`), or read from the table's `label_column`.
    """

    def __init__(self, path: Path, elements: Elements, polygon_ids: np.ndarray | None):
        self.path, self.elements = path, elements
        self.polygons = None if polygon_ids is None else pd.Index(_id_text(polygon_ids))
        self.given: dict[int, object] = {}  # mask value -> id as given, where ids are not mask values

    def values(self, obs: pd.DataFrame, element: str) -> np.ndarray:
        column = self.elements.cell_id
        if column not in obs:
            raise DataError(self.path, element, f"obs has no '{column}' column (columns: {list(obs.columns)})")
        given = obs[column]
        if self.polygons is not None:
            values = self.polygons.get_indexer(_id_text(given.to_numpy())) + 1
            if (values == 0).any():
                missing = given.to_numpy()[values == 0]
                raise DataError(self.path, element, f"{len(missing)} cell_id(s) have no polygon in "
                                                    f"{self.elements.nuclei}, e.g. {list(missing[:5])}")
        elif _integer_ids(given):
            return given.to_numpy(np.int64)
        else:
            label = self.elements.label_column
            if label not in obs:
                raise DataError(self.path, element, f"cell_id holds ids that are not integers (e.g. "
                                                    f"{given.iloc[0]!r}) and obs has no '{label}' column giving "
                                                    f"each cell's value in the mask {self.elements.nuclei}: name it "
                                                    "(--label-column), or give the nuclei as polygons "
                                                    "(--nuclei-element)")
            if not _integer_ids(obs[label]):
                raise DataError(self.path, element, f"obs['{label}'] must hold integers (the cells' values in the "
                                                    f"mask), got {obs[label].dtype}")
            values = obs[label].to_numpy(np.int64)
        self.given.update(zip(values.tolist(), given.tolist()))
        return np.asarray(values, dtype=np.int64)

    def names(self) -> pd.Series | None:
        if self.polygons is not None:
            return pd.Series(self.polygons.to_numpy(dtype=object), index=np.arange(1, len(self.polygons) + 1))
        if not self.given:
            return None
        return pd.Series(list(self.given.values()), index=np.fromiter(self.given, np.int64, len(self.given)),
                         dtype=object)


def _integer_ids(column: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(column.dtype) or (
        pd.api.types.is_float_dtype(column.dtype) and bool(np.all(np.mod(column.to_numpy(), 1) == 0)))


def _id_text(ids) -> np.ndarray:
    """Ids compared as text: a polygon's id and a table's may be stored as str and bytes, or int and str."""
    return np.asarray([i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(ids).tolist()], dtype=object)


def choose_pixel_size(given: float | None, stored: float | None, force: bool, path: str | Path, element: str,
                      where: str) -> float | None:
    """The pixel size to use: the stored one, the given one where none is stored (or where `force`), and a
    DataError naming both where they disagree by more than PIXEL_SIZE_RTOL and nothing forces the given one.
    Shared by every reader of a stored pixel size (samples here, the spot importer's h5ad)."""
    if given is None or stored is None:
        return stored if given is None else float(given)
    if force or abs(given - stored) <= PIXEL_SIZE_RTOL * stored:
        return float(given)
    raise DataError(path, element, f"the given pixel size {given:g} um/px disagrees with the {stored:g} um/px "
                                   f"{where} (by more than {PIXEL_SIZE_RTOL:.0%}): patch sizes in microns would "
                                   "be cut at the wrong scale. Leave it out to use the stored size, or force it "
                                   "(--force-microns-per-pixel, force_microns_per_pixel=True)")


def sample_paths(path: str | Path) -> list[Path]:
    """The sample zarr at `path`, or every `<sample>.zarr` in the folder `path`, sorted by name."""
    path = Path(path)
    if path.suffix == SAMPLE_SUFFIX or is_zarr_group(path):
        return [path]
    if not path.is_dir():
        raise DataError(path, "-", "neither a sample zarr nor a folder of them")
    found = sorted(p for p in path.iterdir() if p.suffix == SAMPLE_SUFFIX)
    if not found:
        raise DataError(path, "-", f"no *{SAMPLE_SUFFIX} sample in this folder")
    return found


def open_samples(path: str | Path, n_genes: int | None = None, microns_per_pixel: float | None = None,
                 force_microns_per_pixel: bool = False, elements: Elements | None = None) -> list[Sample]:
    """A sample zarr, or a folder holding several `<sample>.zarr`, sorted by name (all held open: the fit stage
    opens one at a time instead, see `regress.source.CacheSource`). The samples with expression must share one
    panel (`check_same_genes`); `n_genes` as in `open_sample`."""
    samples = [open_sample(p, n_genes, microns_per_pixel, force_microns_per_pixel, elements)
               for p in sample_paths(path)]
    check_same_genes(samples)
    return samples


def check_same_genes(samples: list[Sample]) -> None:
    """Every sample with expression has the same genes in the same order (before any stage spends time on them)."""
    measured = [s for s in samples if s.has_expression]
    for sample in measured[1:]:
        check_panel(sample, measured[0].genes, measured[0].path.name)


def check_panel(sample: Sample, reference: list[str], reference_name: str) -> None:
    """`sample`'s genes are `reference` (the panel of `reference_name`, e.g. the first training sample), in the same
    order: the fit stacks samples column by column, so a reordered panel would train every gene on another's
    values. A DataError naming the sample's file and the first difference otherwise."""
    problem = _panel_difference(sample.genes, reference, reference_name)
    if problem is not None:
        raise DataError(sample.path, sample.elements.table, problem)


def _panel_difference(genes: list[str], reference: list[str], reference_name: str) -> str | None:
    """What differs between the panel `genes` and `reference` (the panel of `reference_name`), from the first
    position where they differ; None where they are the same genes in the same order."""
    genes, reference = list(genes), list(reference)
    if genes == reference:
        return None
    first = next((i for i, (a, b) in enumerate(zip(genes, reference)) if a != b), min(len(genes), len(reference)))
    here = f"'{genes[first]}'" if first < len(genes) else "no gene"
    there = f"'{reference[first]}'" if first < len(reference) else "no gene"
    where = f"first difference at position {first}: {here} here, {there} in {reference_name}"
    if sorted(genes) == sorted(reference):
        return f"the same genes as {reference_name} but in another order ({where})"
    only_here, only_there = sorted(set(genes) - set(reference)), sorted(set(reference) - set(genes))
    return (f"gene panel differs from {reference_name}'s: {len(genes)} genes here, {len(reference)} there ({where}; "
            f"{len(only_here)} only here, e.g. {only_here[:5]}; {len(only_there)} only there, e.g. {only_there[:5]}). "
            "Every sample with expression needs the same genes in the same order: import them with one panel")


def _check_missing_image_chunks(path: Path, image_files: ChunkFiles | None, mask_files: ChunkFiles | None,
                                element: str = IMAGE) -> None:
    """An image chunk without a file reads as black. zarr also leaves out chunks that equal the fill value, so it is
    wrong only where the mask has nuclei: where the mask chunk there is present (zarr leaves out empty ones too)."""
    if image_files is None:
        return
    missing = image_files.missing()
    if not missing:
        return
    mask_missing = set(mask_files.missing()) if mask_files is not None else set()
    for index in missing:
        ys, xs = image_files.region(index)[-2:]
        if mask_files is None or _mask_has_chunk_in(mask_files, mask_missing, ys, xs):
            raise DataError(path, element, f"{describe_chunk(image_files, index)} is missing ({len(missing)} chunk "
                                         "file(s) missing in all) and would read as black pixels where the mask has "
                                         "nuclei: a partial copy of the sample? Copy it again")


def _mask_has_chunk_in(mask_files: ChunkFiles, mask_missing: set, ys: slice, xs: slice) -> bool:
    cy, cx = mask_files.chunks[-2:]
    lead = (0,) * (len(mask_files.shape) - 2)
    return any(lead + (by, bx) not in mask_missing
               for by in range(ys.start // cy, -(-ys.stop // cy)) for bx in range(xs.start // cx, -(-xs.stop // cx)))


def _sample_name(path: Path) -> str:
    return path.name[: -len(SAMPLE_SUFFIX)] if path.name.endswith(SAMPLE_SUFFIX) else path.name


def _element(sdata, tables: SampleTables, path: Path, name: str, kinds: tuple[str, ...]):
    for kind in kinds:
        elements = getattr(sdata, kind)
        if name in elements:
            return elements[name]
    raise _missing(sdata, tables, path, name)


def _missing(sdata, tables: SampleTables, path: Path, name: str) -> DataError:
    found = sorted(sdata.images) + sorted(sdata.labels) + sorted(sdata.shapes) + tables.names
    return DataError(path, name, f"element missing (found: {found})")


def _scale0(element):
    """Multiscale elements (DataTree) are read at full resolution."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        return next(iter(element["scale0"].values()))
    return element


def _stored_microns_per_pixel(element, path: Path, name: str = IMAGE) -> float | None:
    from spatialdata.transformations import Scale, get_transformation

    transform = get_transformation(element, get_all=True).get(MICRONS)
    if transform is None:
        return None
    if not isinstance(transform, Scale):
        raise DataError(path, name, f"the '{MICRONS}' coordinate system must be a Scale transformation, "
                                     f"got {type(transform).__name__}")
    scale = dict(zip(transform.axes, transform.scale))
    if "y" not in scale or "x" not in scale or not np.isclose(scale["y"], scale["x"], rtol=1e-3):
        raise DataError(path, name, f"the '{MICRONS}' scale must be square in y and x, got {scale}")
    if not scale["x"] > 0:
        raise DataError(path, name, f"the '{MICRONS}' scale must be positive, got {scale}")
    return float(scale["x"])


def _image_element(element, path: Path, name: str = IMAGE) -> da.Array:
    image = _scale0(element)
    if tuple(image.dims) != ("c", "y", "x") or image.shape[0] != 3:
        raise DataError(path, name, f"expected an RGB image with dims (c, y, x) = (3, H, W), got dims "
                                     f"{tuple(image.dims)} shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise DataError(path, name, f"expected uint8 pixels, got {image.dtype}")
    return image.data


def _mask_element(sdata, tables: SampleTables, path: Path, name: str = MASK) -> da.Array:
    mask = _scale0(_element(sdata, tables, path, name, ("images", "labels")))
    data = mask.data
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise DataError(path, name, f"expected one channel (1, H, W), got shape {tuple(data.shape)}")
        data = data[0]
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise DataError(path, name, f"expected an integer (1, H, W) or (H, W) mask, got shape {tuple(data.shape)} "
                                    f"dtype {data.dtype}")
    return data


def _groups(tables: SampleTables, sdata, path: Path, elements: Elements, ids: _CellIds) -> pd.Series:
    name, column = elements.groups, elements.group_column
    if name not in tables:
        raise _missing(sdata, tables, path, name)
    obs = tables.obs(name)
    if column not in obs:
        raise DataError(path, name, f"obs has no '{column}' column (columns: {list(obs.columns)})")
    unknown = sorted(set(obs[column].astype(str)) - set(GROUP_NAMES))
    if unknown:
        raise DataError(path, name, f"unknown group value(s) {unknown} in obs['{column}']; expected "
                                    f"{list(GROUP_NAMES)}")
    values = ids.values(obs, name)
    if len(np.unique(values)) != len(values):
        raise DataError(path, name, f"{elements.cell_id} is not unique")
    return pd.Series(obs[column].astype(str).to_numpy(), index=pd.Index(values, name="cell_id"), name="group")


def _expression(tables: SampleTables, path: Path, n_genes: int | None, elements: Elements, ids: _CellIds
                ) -> ad.AnnData | None:
    name = elements.table
    if name not in tables:
        return None
    obs = tables.obs(name)
    stored = len(obs)
    kept = np.arange(stored)
    if name == elements.groups:  # one table for both: its test rows are hidden, as the challenge hides them
        kept = np.flatnonzero(obs[elements.group_column].astype(str).to_numpy() != "test")
        obs = obs.iloc[kept].copy()
        for column in obs.select_dtypes("category"):  # as AnnData's subset leaves them
            obs[column] = obs[column].cat.remove_unused_categories()
    if len(obs) == 0:
        return None
    var = tables.var(name)
    if n_genes is not None and len(var) != n_genes:
        raise DataError(path, name, f"expected {n_genes} genes, found {len(var)}")
    repeated = var.index[var.index.duplicated()].unique()
    if len(repeated):  # a gene twice would be fitted twice and written twice, for the same (cell_id, gene) row
        raise DataError(path, name, f"{len(repeated)} gene name(s) appear more than once in var_names, e.g. "
                                    f"{[str(g) for g in repeated[:5]]}: each gene must be one column")
    values = dense(tables.x(name))
    if values.shape != (stored, len(var)):
        raise DataError(path, name, f"X has shape {values.shape}, but obs and var give {(stored, len(var))}")
    if len(kept) != stored:
        values = values[kept]
    if np.isnan(values).any():
        raise DataError(path, name, f"X holds {int(np.isnan(values).sum())} NaN value(s)")
    if (values < 0).any():
        raise DataError(path, name, f"X holds {int((values < 0).sum())} negative value(s); "
                                    "expected log1p(counts / total * 100)")
    rows = _checked_rows(values.shape[0])
    _check_normalisation(path, values, rows, tables.counts_rows(name, kept[rows]), name)
    cell_ids = ids.values(obs, name)
    if len(np.unique(cell_ids)) != len(cell_ids):
        raise DataError(path, name, f"{elements.cell_id} is not unique")
    obs = obs.copy()  # extra columns (e.g. the spot of an imported nucleus) stay available
    obs["cell_id"] = cell_ids
    return ad.AnnData(X=values, obs=obs, var=var.copy())


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """log1p(counts / total * 100) per row, the total over the given genes: the challenge's `anucleus.X` (float64)."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.where(totals > 0, totals, 1) * SCALE_FACTOR)


def _checked_rows(n: int) -> np.ndarray:
    """ROWS_CHECKED evenly spaced rows of n (all where fewer): the rows whose counts the normalisation check reads."""
    return np.unique(np.linspace(0, n - 1, min(ROWS_CHECKED, n)).astype(np.int64))


def _check_normalisation(path: Path, values: np.ndarray, rows: np.ndarray, raw_rows, element: str = EXPRESSION
                         ) -> None:
    """X must be log1p(counts / total * 100): equal to it on the checked `rows`, whose counts are `raw_rows`, where
    layers['counts'] exists (`raw_rows` None where not), and within its range (at most log1p(100)) everywhere.
    Raw counts or another scale would train and validate silently."""
    unit = f"log1p(counts / total * {SCALE_FACTOR})"
    if raw_rows is not None:
        raw = dense(raw_rows).astype(np.float64)
        if raw.shape != (len(rows), values.shape[1]):
            raise DataError(path, element, f"layers['counts'] has {raw.shape[1]} columns, X {values.shape[1]}")
        if (raw < 0).any():
            raise DataError(path, element, f"layers['counts'] holds negative values (e.g. {raw[raw < 0][0]:g}); "
                                              "counts cannot be negative")
        expected = log_normalise(raw)
        error = np.abs(values[rows] - expected)
        tolerance = EXPRESSION_ATOL + EXPRESSION_ATOL * expected
        if (error > tolerance).any():
            row, gene = np.unravel_index(np.argmax(error - tolerance), error.shape)
            raise DataError(path, element, f"X is not {unit} of layers['counts']: row {int(rows[row])}, gene "
                                              f"{int(gene)} holds {values[rows[row], gene]:.4g}, the counts give "
                                              f"{expected[row, gene]:.4g}")
    top = float(values.max(initial=0.0))
    if top > MAX_LOG_EXPRESSION + EXPRESSION_ATOL:
        looks = "raw counts" if np.array_equal(values, np.round(values)) else "another scale"
        raise DataError(path, element, f"X holds values up to {top:.4g}, but {unit} is at most log1p(100) = "
                                          f"{MAX_LOG_EXPRESSION:.3f}: this looks like {looks}. Store {unit} in X "
                                          "(and the counts in layers['counts'])")


def _array_digest(arrays: list[da.Array]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        for block in np.ndindex(*array.numblocks):
            digest.update(np.ascontiguousarray(array.blocks[block].compute(scheduler="synchronous")).tobytes())
    return digest.hexdigest()


def _undecodable_block(array: da.Array, window: tuple[slice, slice] | None
                       ) -> tuple[tuple[int, ...], Exception] | None:
    """(block index, its error) of the first chunk in the (y, x) window that fails to read, or None."""
    starts = [np.r_[0, np.cumsum(c)[:-1]] for c in array.chunks]
    for block in np.ndindex(*array.numblocks):
        if window is not None:
            inside = True
            for axis, limits in zip((-2, -1), window):
                lo = starts[axis][block[axis]]
                hi = lo + array.chunks[axis][block[axis]]
                inside &= bool(lo < limits.stop and limits.start < hi)
            if not inside:
                continue
        try:
            array.blocks[block].compute(scheduler="synchronous")
        except Exception as exc:  # whatever the codec raises: it is the chunk's bytes
            return block, exc
    return None


def _block_description(array: da.Array, block: tuple[int, ...], files: ChunkFiles | None) -> str:
    """The chunk's file name where the dask blocks are the zarr chunks (as spatialdata reads them), else its region."""
    starts = [int(sum(c[: i])) for c, i in zip(array.chunks, block)]
    y0, x0 = starts[-2], starts[-1]
    y1, x1 = y0 + array.chunks[-2][block[-2]], x0 + array.chunks[-1][block[-1]]
    if files is not None and tuple(files.chunks[-2:]) == (array.chunks[-2][0], array.chunks[-1][0]):
        index = (0,) * (len(files.shape) - 2) + tuple(block[-2:])
        return describe_chunk(files, index)
    return f"the chunk at rows {y0}:{y1}, columns {x0}:{x1}"


def dense(matrix, dtype=np.float32) -> np.ndarray:
    """A table's X (or a layer), sparse or not, as a dense array."""
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    return np.asarray(matrix, dtype=dtype)


def _read_padded(array: da.Array, y0: int, y1: int, x0: int, x1: int, pad_mode: str, constant: int) -> np.ndarray:
    height, width = array.shape[-2:]
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if cy0 >= cy1 or cx0 >= cx1:
        return np.full((array.shape[0], y1 - y0, x1 - x0), constant, dtype=array.dtype)
    window = np.asarray(array[:, cy0:cy1, cx0:cx1].compute(scheduler="synchronous"))
    pads = ((0, 0), (cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1))
    if any(p for pair in pads for p in pair):
        if pad_mode == "constant":
            window = np.pad(window, pads, mode="constant", constant_values=constant)
        else:
            window = np.pad(window, pads, mode=pad_mode)
    return window
