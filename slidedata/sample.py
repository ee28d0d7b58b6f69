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

from slidedata.errors import DataError

log = logging.getLogger(__name__)

IMAGE = "HE_original"
MASK = "HE_nuc_original"
EXPRESSION = "anucleus"
GROUPS = "cell_id-group"
N_GENES = 460
GROUP_NAMES = ("train", "validation", "test")
HELD_OUT_GROUPS = ("validation", "test")
SAMPLE_SUFFIX = ".zarr"
MICRONS = "microns"  # coordinate system whose scale transformation of HE_original gives the pixel size


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
    _nuclei: pd.DataFrame | None = field(default=None, repr=False)

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
            from slidedata.nuclei import nuclei_from_mask

            table = nuclei_from_mask(self.mask, progress=progress, desc=f"{self.name}: nuclei")
            self._check_tables_against_mask(table)
            self._nuclei = table
        return self._nuclei

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
        out[measured] = _dense(self.expression.X[rows[measured]])
        return out, measured

    def group_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """Group name per cell_id; 'unassigned' where the group table does not list the nucleus."""
        return self.groups.reindex(np.asarray(cell_ids, dtype=np.int64)).fillna("unassigned").to_numpy(dtype=object)

    def read_image(self, y0: int, y1: int, x0: int, x1: int, pad_mode: str = "symmetric") -> np.ndarray:
        """Image window [y0, y1) x [x0, x1) as (3, h, w) uint8; the part outside the slide is padded."""
        return _read_padded(self.image, y0, y1, x0, x1, pad_mode, constant=255)

    def read_mask(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Mask window as (h, w); outside the slide is background (0)."""
        return _read_padded(self.mask[None], y0, y1, x0, x1, "constant", constant=0)[0]

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


def open_sample(path: str | Path, n_genes: int | None = N_GENES, microns_per_pixel: float | None = None) -> Sample:
    """Open and validate one sample zarr. `n_genes=None` accepts any gene panel size.

    The pixel size is the one stored with the sample (a 'microns' coordinate system); `microns_per_pixel` gives it
    for samples that store none and overrides a stored one.
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
    groups = _groups(sdata, path)
    expression = _expression(sdata, path, n_genes)
    if microns_per_pixel is None:
        microns_per_pixel = _stored_microns_per_pixel(image_element, path)
    elif not microns_per_pixel > 0:
        raise DataError(path, IMAGE, f"microns per pixel must be positive, got {microns_per_pixel}")
    return Sample(name=_sample_name(path), path=path, image=image, mask=mask, groups=groups, expression=expression,
                  microns_per_pixel=microns_per_pixel)


def open_samples(path: str | Path, n_genes: int | None = N_GENES, microns_per_pixel: float | None = None
                 ) -> list[Sample]:
    """A sample zarr, or a folder holding several `<sample>.zarr`, sorted by name."""
    path = Path(path)
    if path.suffix == SAMPLE_SUFFIX or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        return [open_sample(path, n_genes, microns_per_pixel)]
    if not path.is_dir():
        raise DataError(path, "-", "neither a sample zarr nor a folder of them")
    found = sorted(p for p in path.iterdir() if p.suffix == SAMPLE_SUFFIX)
    if not found:
        raise DataError(path, "-", f"no *{SAMPLE_SUFFIX} sample in this folder")
    return [open_sample(p, n_genes, microns_per_pixel) for p in found]


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
    values = _dense(table.X)
    if np.isnan(values).any():
        raise DataError(path, EXPRESSION, f"X holds {int(np.isnan(values).sum())} NaN value(s)")
    if (values < 0).any():
        raise DataError(path, EXPRESSION, f"X holds {int((values < 0).sum())} negative value(s); "
                                          "expected log1p(counts / total * 100)")
    ids = table.obs["cell_id"].to_numpy(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(path, EXPRESSION, "cell_id is not unique")
    obs = table.obs.copy()  # extra columns (e.g. the spot of an imported nucleus) stay available
    obs["cell_id"] = ids
    return ad.AnnData(X=values, obs=obs, var=table.var.copy())


def _dense(matrix) -> np.ndarray:
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    return np.asarray(matrix, dtype=np.float32)


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
