"""Open one Crunch-format sample (a SpatialData zarr) and check it is what the pipeline expects.

Every stage reads samples through this module only, so the format's quirks (the mask is an *image* element, ids are
not contiguous, held-out nuclei are absent from the expression table) are handled in one place.
"""

from __future__ import annotations

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
                raise DataError(self.path, MASK, str(exc)) from exc
            except Exception as exc:
                error = self._read_error(MASK, self.mask, None)
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

    def group_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """Group name per cell_id; 'unassigned' where the group table does not list the nucleus."""
        return self.groups.reindex(np.asarray(cell_ids, dtype=np.int64)).fillna("unassigned").to_numpy(dtype=object)

    def read_image(self, y0: int, y1: int, x0: int, x1: int, pad_mode: str = "symmetric") -> np.ndarray:
        """Image window [y0, y1) x [x0, x1) as (3, h, w) uint8; the part outside the slide is padded."""
        return self._read(IMAGE, self.image, y0, y1, x0, x1, pad_mode, constant=255)

    def read_mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Mask window as (h, w); outside the slide is background (0)."""
        return self._read(MASK, self.mask[None], y0, y1, x0, x1, "constant", constant=0)[0]

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
        files = self.image_files if element == IMAGE else self.mask_files
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
                raise DataError(self.path, MASK, f"{describe_chunk(self.mask_files, index)} is missing, but "
                                                 f"{len(cut)} nucleus/nuclei end at its edge as if cut off there "
                                                 f"(e.g. cell_id {cut[0]}): a partial copy of the sample? Copy it "
                                                 "again")

    def _check_tables_against_mask(self, nuclei: pd.DataFrame) -> None:
        in_mask = pd.Index(nuclei["cell_id"].to_numpy())
        tables = [(GROUPS, self.groups.index.to_numpy())]
        if self.has_expression:
            tables.append((EXPRESSION, self.expression.obs["cell_id"].to_numpy(np.int64)))
        for element, ids in tables:
            missing = ids[~pd.Index(ids).isin(in_mask)]
            if len(missing):
                raise DataError(
                    self.path, element,
                    f"{len(missing)} cell_id(s) are not in the mask {MASK}, e.g. {missing[:5].tolist()}",
                )
        unlisted = ~in_mask.isin(self.groups.index)
        if unlisted.any():
            log.warning("%s: %d nuclei of the mask have no row in %s; they get no prediction",
                        self.path, int(unlisted.sum()), GROUPS)


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
                force_microns_per_pixel: bool = False) -> Sample:
    """Open and validate one sample zarr. Its gene panel is the one its `anucleus` holds, of any size; `n_genes`
    demands a panel of exactly that many genes (a DataError naming the file otherwise).

    The pixel size is the one stored with the sample (a 'microns' coordinate system); `microns_per_pixel` gives it
    for samples that store none. A given size that disagrees with a stored one is refused (DataError naming both)
    unless `force_microns_per_pixel`, which makes the given one win.
    """
    import spatialdata as sd

    path = Path(path)
    if not path.exists():
        raise DataError(path, "-", "no such file or folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata = sd.read_zarr(path)
    except Exception as exc:  # the reader raises many types; the user needs the file name
        raise DataError(path, "-", f"not a readable SpatialData zarr ({type(exc).__name__}: {exc})") from exc

    image_element = _element(sdata, path, IMAGE, ("images",))
    image = _image_element(image_element, path)
    mask = _mask_element(sdata, path)
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise DataError(path, MASK, f"mask shape {tuple(mask.shape)} differs from {IMAGE} shape "
                                    f"{tuple(image.shape[1:])}")
    image_files = ChunkFiles.find(path / "images" / IMAGE)
    mask_files = next((f for f in (ChunkFiles.find(path / kind / MASK) for kind in ("images", "labels")) if f), None)
    _check_missing_image_chunks(path, image_files, mask_files)
    groups = _groups(sdata, path)
    expression = _expression(sdata, path, n_genes)
    if microns_per_pixel is not None and not microns_per_pixel > 0:
        raise DataError(path, IMAGE, f"microns per pixel must be positive, got {microns_per_pixel}")
    forced = force_microns_per_pixel and microns_per_pixel is not None  # a forced size needs no stored one
    stored = None if forced else _stored_microns_per_pixel(image_element, path)
    microns_per_pixel = choose_pixel_size(microns_per_pixel, stored, force_microns_per_pixel, path, IMAGE,
                                          "stored with the sample")
    return Sample(name=_sample_name(path), path=path, image=image, mask=mask, groups=groups, expression=expression,
                  microns_per_pixel=microns_per_pixel, image_files=image_files, mask_files=mask_files)


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
    if path.suffix == SAMPLE_SUFFIX or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        return [path]
    if not path.is_dir():
        raise DataError(path, "-", "neither a sample zarr nor a folder of them")
    found = sorted(p for p in path.iterdir() if p.suffix == SAMPLE_SUFFIX)
    if not found:
        raise DataError(path, "-", f"no *{SAMPLE_SUFFIX} sample in this folder")
    return found


def open_samples(path: str | Path, n_genes: int | None = None, microns_per_pixel: float | None = None,
                 force_microns_per_pixel: bool = False) -> list[Sample]:
    """A sample zarr, or a folder holding several `<sample>.zarr`, sorted by name (all held open: the fit stage
    opens one at a time instead, see `regress.source.CacheSource`). The samples with expression must share one
    panel (`check_same_genes`); `n_genes` as in `open_sample`."""
    samples = [open_sample(p, n_genes, microns_per_pixel, force_microns_per_pixel) for p in sample_paths(path)]
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
        raise DataError(sample.path, EXPRESSION, problem)


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


def _check_missing_image_chunks(path: Path, image_files: ChunkFiles | None, mask_files: ChunkFiles | None) -> None:
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
            raise DataError(path, IMAGE, f"{describe_chunk(image_files, index)} is missing ({len(missing)} chunk "
                                         "file(s) missing in all) and would read as black pixels where the mask has "
                                         "nuclei: a partial copy of the sample? Copy it again")


def _mask_has_chunk_in(mask_files: ChunkFiles, mask_missing: set, ys: slice, xs: slice) -> bool:
    cy, cx = mask_files.chunks[-2:]
    lead = (0,) * (len(mask_files.shape) - 2)
    return any(lead + (by, bx) not in mask_missing
               for by in range(ys.start // cy, -(-ys.stop // cy)) for bx in range(xs.start // cx, -(-xs.stop // cx)))


def _sample_name(path: Path) -> str:
    return path.name[: -len(SAMPLE_SUFFIX)] if path.name.endswith(SAMPLE_SUFFIX) else path.name


def _element(sdata, path: Path, name: str, kinds: tuple[str, ...]):
    for kind in kinds:
        elements = getattr(sdata, kind)
        if name in elements:
            return elements[name]
    raise DataError(path, name, f"element missing (found: {sorted(sdata.images) + sorted(sdata.labels) + sorted(sdata.tables)})")


def _scale0(element):
    """Multiscale elements (DataTree) are read at full resolution."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        return next(iter(element["scale0"].values()))
    return element


def _stored_microns_per_pixel(element, path: Path) -> float | None:
    from spatialdata.transformations import Scale, get_transformation

    transform = get_transformation(element, get_all=True).get(MICRONS)
    if transform is None:
        return None
    if not isinstance(transform, Scale):
        raise DataError(path, IMAGE, f"the '{MICRONS}' coordinate system must be a Scale transformation, "
                                     f"got {type(transform).__name__}")
    scale = dict(zip(transform.axes, transform.scale))
    if "y" not in scale or "x" not in scale or not np.isclose(scale["y"], scale["x"], rtol=1e-3):
        raise DataError(path, IMAGE, f"the '{MICRONS}' scale must be square in y and x, got {scale}")
    if not scale["x"] > 0:
        raise DataError(path, IMAGE, f"the '{MICRONS}' scale must be positive, got {scale}")
    return float(scale["x"])


def _image_element(element, path: Path) -> da.Array:
    image = _scale0(element)
    if tuple(image.dims) != ("c", "y", "x") or image.shape[0] != 3:
        raise DataError(path, IMAGE, f"expected an RGB image with dims (c, y, x) = (3, H, W), got dims "
                                     f"{tuple(image.dims)} shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise DataError(path, IMAGE, f"expected uint8 pixels, got {image.dtype}")
    return image.data


def _mask_element(sdata, path: Path) -> da.Array:
    mask = _scale0(_element(sdata, path, MASK, ("images", "labels")))
    data = mask.data
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise DataError(path, MASK, f"expected one channel (1, H, W), got shape {tuple(data.shape)}")
        data = data[0]
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise DataError(path, MASK, f"expected an integer (1, H, W) or (H, W) mask, got shape {tuple(data.shape)} "
                                    f"dtype {data.dtype}")
    return data


def _groups(sdata, path: Path) -> pd.Series:
    table = _element(sdata, path, GROUPS, ("tables",))
    obs = table.obs
    for column in ("cell_id", "group"):
        if column not in obs:
            raise DataError(path, GROUPS, f"obs has no '{column}' column (columns: {list(obs.columns)})")
    unknown = sorted(set(obs["group"].astype(str)) - set(GROUP_NAMES))
    if unknown:
        raise DataError(path, GROUPS, f"unknown group value(s) {unknown}; expected {list(GROUP_NAMES)}")
    ids = obs["cell_id"].to_numpy(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(path, GROUPS, "cell_id is not unique")
    return pd.Series(obs["group"].astype(str).to_numpy(), index=pd.Index(ids, name="cell_id"), name="group")


def _expression(sdata, path: Path, n_genes: int | None) -> ad.AnnData | None:
    if EXPRESSION not in sdata.tables:
        return None
    table = sdata.tables[EXPRESSION]
    if table.n_obs == 0:
        return None
    if "cell_id" not in table.obs:
        raise DataError(path, EXPRESSION, "obs has no 'cell_id' column")
    if n_genes is not None and table.n_vars != n_genes:
        raise DataError(path, EXPRESSION, f"expected {n_genes} genes, found {table.n_vars}")
    repeated = table.var_names[table.var_names.duplicated()].unique()
    if len(repeated):  # a gene twice would be fitted twice and written twice, for the same (cell_id, gene) row
        raise DataError(path, EXPRESSION, f"{len(repeated)} gene name(s) appear more than once in var_names, e.g. "
                                          f"{[str(g) for g in repeated[:5]]}: each gene must be one column")
    values = dense(table.X)
    if np.isnan(values).any():
        raise DataError(path, EXPRESSION, f"X holds {int(np.isnan(values).sum())} NaN value(s)")
    if (values < 0).any():
        raise DataError(path, EXPRESSION, f"X holds {int((values < 0).sum())} negative value(s); "
                                          "expected log1p(counts / total * 100)")
    _check_normalisation(path, values, table.layers["counts"] if "counts" in table.layers else None)
    ids = table.obs["cell_id"].to_numpy(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(path, EXPRESSION, "cell_id is not unique")
    obs = table.obs.copy()  # extra columns (e.g. the spot of an imported nucleus) stay available
    obs["cell_id"] = ids
    return ad.AnnData(X=values, obs=obs, var=table.var.copy())


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """log1p(counts / total * 100) per row, the total over the given genes: the challenge's `anucleus.X` (float64)."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.where(totals > 0, totals, 1) * SCALE_FACTOR)


def _check_normalisation(path: Path, values: np.ndarray, counts) -> None:
    """X must be log1p(counts / total * 100): equal to it where layers['counts'] exists, and within its range
    (at most log1p(100)) where it does not. Raw counts or another scale would train and validate silently."""
    unit = f"log1p(counts / total * {SCALE_FACTOR})"
    if counts is not None:
        rows = np.unique(np.linspace(0, values.shape[0] - 1, min(ROWS_CHECKED, values.shape[0])).astype(np.int64))
        raw = dense(counts[rows]).astype(np.float64)
        if (raw < 0).any():
            raise DataError(path, EXPRESSION, f"layers['counts'] holds negative values (e.g. {raw[raw < 0][0]:g}); "
                                              "counts cannot be negative")
        expected = log_normalise(raw)
        error = np.abs(values[rows] - expected)
        tolerance = EXPRESSION_ATOL + EXPRESSION_ATOL * expected
        if (error > tolerance).any():
            row, gene = np.unravel_index(np.argmax(error - tolerance), error.shape)
            raise DataError(path, EXPRESSION, f"X is not {unit} of layers['counts']: row {int(rows[row])}, gene "
                                              f"{int(gene)} holds {values[rows[row], gene]:.4g}, the counts give "
                                              f"{expected[row, gene]:.4g}")
    top = float(values.max(initial=0.0))
    if top > MAX_LOG_EXPRESSION + EXPRESSION_ATOL:
        looks = "raw counts" if np.array_equal(values, np.round(values)) else "another scale"
        raise DataError(path, EXPRESSION, f"X holds values up to {top:.4g}, but {unit} is at most log1p(100) = "
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
