"""Read spot-level spatial transcriptomics sections (image, spot centres, spot x gene counts) into one neutral type.

Two layouts are read: the her2st folder (`HE.jpg`, `counts.tsv.gz`, `spots.tsv`; legacy Spatial Transcriptomics
arrays) and an AnnData `.h5ad` whose `obsm['spatial']` holds full-resolution pixel positions in (x, y) order (the
layout of HEST-1k and scanpy's Visium reader) beside an image file. Everything downstream (gene panel, cells, the
sample zarr) works on `SpotSection` only, so a new layout needs one reader and nothing else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from slidedata.errors import DataError
from slidedata.sample import choose_pixel_size

HER2ST_IMAGE = "HE.jpg"
HER2ST_COUNTS = "counts.tsv.gz"
HER2ST_SPOTS = "spots.tsv"
# Legacy Spatial Transcriptomics arrays (Stahl et al. 2016): 100 um spots, 200 um centre to centre.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
# Keys under which a pixel size may sit in uns['spatial'][library]['scalefactors'] (HEST-1k's metadata names first).
PIXEL_SIZE_KEYS = ("pixel_size_um_embedded", "pixel_size_um_estimated", "pixel_size_um", "microns_per_pixel")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff")


@dataclass
class SpotSection:
    """One tissue section measured in spots: what an importer needs, independent of the file layout."""

    name: str
    image: np.ndarray | Path  # (H, W, 3) uint8, or the image file, read only when needed (one section at a time)
    centres_px: np.ndarray  # (n, 2) float, spot centres as (y, x) in full-resolution image pixels
    counts: np.ndarray | sparse.spmatrix  # (n, genes) integer counts
    genes: list[str]
    spot_ids: list[str]
    microns_per_pixel: float
    spot_diameter_um: float
    source: Path  # the file holding the spot positions (named in errors about them)
    counts_file: Path | None = None  # the file the counts came from, for errors about genes and counts

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    @property
    def spot_radius_px(self) -> float:
        return self.spot_diameter_um / 2 / self.microns_per_pixel

    def load_image(self) -> np.ndarray:
        return self.image if isinstance(self.image, np.ndarray) else read_rgb_image(self.image)

    def image_shape(self) -> tuple[int, int]:
        """(H, W) without decoding the pixels when the image is a file."""
        if isinstance(self.image, np.ndarray):
            return int(self.image.shape[0]), int(self.image.shape[1])
        return image_file_shape(self.image)

    def total_counts(self) -> np.ndarray:
        return np.asarray(self.counts.sum(axis=1)).ravel()

    def subset(self, keep: np.ndarray) -> SpotSection:
        """The section restricted to the spots where `keep` is true."""
        keep = np.asarray(keep, dtype=bool)
        return SpotSection(self.name, self.image, self.centres_px[keep], self.counts[keep], self.genes,
                           [s for s, k in zip(self.spot_ids, keep) if k], self.microns_per_pixel,
                           self.spot_diameter_um, self.source, self.counts_file)

    def validate(self) -> SpotSection:
        """Check counts and centres against each other and against the image; raise DataError naming the file."""
        counts_file = self.counts_file or self.source
        n = self.n_spots
        if self.counts.shape != (n, len(self.genes)):
            raise DataError(counts_file, "counts", f"count matrix shape {self.counts.shape} does not match "
                                                   f"{n} spots x {len(self.genes)} genes")
        if self.centres_px.shape != (n, 2):
            raise DataError(self.source, "spot centres", f"expected ({n}, 2) centres, got {self.centres_px.shape}")
        if len(set(self.genes)) != len(self.genes):
            duplicated = pd.Index(self.genes)[pd.Index(self.genes).duplicated()].unique().tolist()
            raise DataError(counts_file, "genes", f"duplicated gene names, e.g. {duplicated[:5]}")
        _check_integer_counts(self.counts, counts_file)
        if not np.isfinite(self.centres_px).all():
            raise DataError(self.source, "spot centres", "spot centres hold NaN or infinite values")
        height, width = self.image_shape()
        y, x = self.centres_px[:, 0], self.centres_px[:, 1]
        outside = (y < 0) | (y >= height) | (x < 0) | (x >= width)
        if outside.any():
            examples = [f"{self.spot_ids[i]} at (y={y[i]:.0f}, x={x[i]:.0f})" for i in np.flatnonzero(outside)[:3]]
            raise DataError(self.source, "spot centres", f"{int(outside.sum())} spot centre(s) outside the "
                                                         f"{height} x {width} image, e.g. {examples}")
        if not (self.microns_per_pixel > 0 and self.spot_diameter_um > 0):
            raise DataError(self.source, "-", f"pixel size ({self.microns_per_pixel}) and spot diameter "
                                              f"({self.spot_diameter_um}) must be positive")
        return self


def _check_integer_counts(counts, path: Path) -> None:
    values = counts.data if sparse.issparse(counts) else np.asarray(counts)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise DataError(path, "counts", "counts hold NaN or infinite values")
        fractional = values != np.round(values)
        if fractional.any():
            raise DataError(path, "counts", f"{int(fractional.sum())} non-integer count(s), e.g. "
                                            f"{values[fractional][:3].tolist()}; expected raw UMI counts")
    elif values.dtype.kind not in "iu":
        raise DataError(path, "counts", f"counts must be numbers, got dtype {values.dtype}")
    if (values < 0).any():
        raise DataError(path, "counts", f"{int((values < 0).sum())} negative count(s)")


# ---------------------------------------------------------------------------------------------------------- images

@contextlib.contextmanager
def _large_images_allowed():
    """Pillow refuses images above ~89 Mpx as a decompression-bomb guard; whole-slide JPEGs are larger (~92 Mpx)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _is_tiff(path: Path) -> bool:
    return path.name.lower().endswith(TIFF_SUFFIXES)


def image_file_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    path = Path(path)
    try:
        if _is_tiff(path):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].levels[0].shape
                axes = tif.series[0].levels[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        with _large_images_allowed() as Image, Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise DataError(path, "-", "image file not found") from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, "-", f"unreadable image ({type(exc).__name__}: {exc})") from exc


def read_rgb_image(path: str | Path) -> np.ndarray:
    """A JPEG/PNG/TIFF as (H, W, 3) uint8 (full resolution; alpha dropped; grey or 16-bit images refused)."""
    path = Path(path)
    try:
        if _is_tiff(path):
            import tifffile

            pixels = tifffile.imread(path, series=0, level=0)
        else:
            with _large_images_allowed() as Image, Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB") if image.mode in ("RGBA", "P", "CMYK", "YCbCr") else image)
    except FileNotFoundError:
        raise DataError(path, "-", "image file not found") from None
    except Exception as exc:
        raise DataError(path, "-", f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar TIFF
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise DataError(path, "-", f"expected an RGB image, got array shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise DataError(path, "-", f"expected 8-bit RGB pixels, got {pixels.dtype}")
    return np.ascontiguousarray(pixels[..., :3])


# ------------------------------------------------------------------------------------------------- pixel size

def array_pitch_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Pixels per array step on a square array grid, from a least-squares affine fit array -> pixel position.

    Uses every spot, so the detection jitter of single centres (~15-20 px on her2st) averages out.
    """
    design = np.c_[array_xy, np.ones(len(array_xy))]
    coefficients = np.linalg.lstsq(design, pixel_xy, rcond=None)[0]
    return float(np.linalg.norm(coefficients[:2], axis=1).mean())


# --------------------------------------------------------------------------------------------------- her2st

def read_her2st_section(folder: str | Path, microns_per_pixel: float | None = None,
                        spot_diameter_um: float = ST_SPOT_DIAMETER_UM, name: str | None = None) -> SpotSection:
    """One her2st section folder: `HE.jpg`, `counts.tsv.gz` (rows `<x>x<y>`), `spots.tsv` (x y ... pixel_x pixel_y).

    The pixel size, unless given, comes from the 200 um spot pitch: an affine fit of array coordinates to pixel
    centres (0.685-0.692 um/px on the four her2st sections). Spots listed without counts are ignored; count rows
    without a spot position are an error.
    """
    folder = Path(folder)
    image, counts_file, spots_file = folder / HER2ST_IMAGE, folder / HER2ST_COUNTS, folder / HER2ST_SPOTS
    for path in (image, counts_file, spots_file):
        if not path.exists():
            raise DataError(path, "-", "file not found (a her2st section folder holds "
                                       f"{HER2ST_IMAGE}, {HER2ST_COUNTS} and {HER2ST_SPOTS})")
    spots = _read_table(spots_file, index_col=None)
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise DataError(spots_file, "columns", f"missing column(s) {missing} (found {list(spots.columns)})")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    if spots.index.duplicated().any():
        raise DataError(spots_file, "x, y", f"duplicated array positions, e.g. "
                                            f"{spots.index[spots.index.duplicated()][:3].tolist()}")

    counts = _read_table(counts_file, index_col=0)
    counts.index = counts.index.astype(str)
    unplaced = ~counts.index.isin(spots.index)
    if unplaced.any():
        raise DataError(counts_file, "rows", f"{int(unplaced.sum())} of {len(counts)} count rows have no position "
                                             f"in {spots_file.name}, e.g. {counts.index[unplaced][:3].tolist()}")
    spots = spots.loc[counts.index]
    if microns_per_pixel is None:
        pitch = array_pitch_px(spots[["x", "y"]].to_numpy(float), spots[["pixel_x", "pixel_y"]].to_numpy(float))
        microns_per_pixel = ST_SPOT_PITCH_UM / pitch
    values = counts.to_numpy()
    if values.dtype == object:
        raise DataError(counts_file, "counts", "non-numeric values in the count table")
    return SpotSection(
        name=name or folder.name, image=image,
        centres_px=spots[["pixel_y", "pixel_x"]].to_numpy(float),  # (column, row) in the file -> (y, x)
        counts=values, genes=[str(g) for g in counts.columns], spot_ids=counts.index.tolist(),
        microns_per_pixel=float(microns_per_pixel), spot_diameter_um=float(spot_diameter_um),
        source=spots_file, counts_file=counts_file,
    ).validate()


def _read_table(path: Path, index_col) -> pd.DataFrame:
    try:
        # low_memory=False: each column's type is decided once, over all rows, instead of per block of rows, where a
        # column numeric in one block and not in another raised pandas' DtypeWarning (a non-numeric count is then
        # refused by its reader, with the file named).
        return pd.read_csv(path, sep="\t", index_col=index_col, low_memory=False)
    except Exception as exc:
        raise DataError(path, "-", f"not a readable tab-separated table ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------------------------ h5ad

def read_h5ad_section(h5ad: str | Path, image: str | Path, microns_per_pixel: float | None = None,
                      spot_diameter_um: float | None = None, name: str | None = None,
                      library_id: str | None = None, force_microns_per_pixel: bool = False) -> SpotSection:
    """An AnnData of spots whose `obsm['spatial']` holds full-resolution pixel centres as (x, y), and its image.

    Counts: `layers['counts']` when present, else `X` (which must then hold integer counts). The spot diameter in
    px is `uns['spatial'][library]['scalefactors']['spot_diameter_fullres']` when present. Pixel size: a pixel size
    stored in the scalefactors (HEST-1k's names), else the argument, else spot_diameter_um / spot_diameter_fullres;
    an argument that disagrees with a stored size is refused unless `force_microns_per_pixel`.
    Spot diameter in um: the argument, else pixel size x spot_diameter_fullres. Whatever cannot be derived is an
    error asking for the argument.
    """
    import anndata as ad

    h5ad = Path(h5ad)
    if not h5ad.exists():
        raise DataError(h5ad, "-", "file not found")
    try:
        table = ad.read_h5ad(h5ad)
    except Exception as exc:
        raise DataError(h5ad, "-", f"not a readable h5ad ({type(exc).__name__}: {exc})") from exc
    if "spatial" not in table.obsm:
        raise DataError(h5ad, "obsm['spatial']", "missing: spot centres in full-resolution pixels are required")
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise DataError(h5ad, "obsm['spatial']", f"expected (n_spots, 2) pixel positions, got shape {xy.shape}")
    counts = table.layers["counts"] if "counts" in table.layers else table.X
    counts = counts.tocsr() if sparse.issparse(counts) else np.asarray(counts)

    scalefactors = _scalefactors(table.uns, library_id)
    diameter_px = scalefactors.get("spot_diameter_fullres")
    stored = next((float(scalefactors[k]) for k in PIXEL_SIZE_KEYS if k in scalefactors), None)
    microns_per_pixel = choose_pixel_size(microns_per_pixel, stored, force_microns_per_pixel, h5ad,
                                          "uns['spatial']", "stored in its scalefactors")
    if microns_per_pixel is None:
        if spot_diameter_um is not None and diameter_px:
            microns_per_pixel = spot_diameter_um / float(diameter_px)
        else:
            raise DataError(h5ad, "uns['spatial']", "no pixel size: give microns_per_pixel (--microns-per-pixel), "
                                                    "or spot_diameter_um with scalefactors['spot_diameter_fullres']")
    if spot_diameter_um is None:
        if not diameter_px:
            raise DataError(h5ad, "uns['spatial']", "no scalefactors['spot_diameter_fullres']: give "
                                                    "spot_diameter_um (--spot-diameter-um)")
        spot_diameter_um = float(diameter_px) * microns_per_pixel
    return SpotSection(
        name=name or h5ad.stem, image=Path(image), centres_px=xy[:, [1, 0]], counts=counts,
        genes=[str(g) for g in table.var_names], spot_ids=[str(s) for s in table.obs_names],
        microns_per_pixel=float(microns_per_pixel), spot_diameter_um=float(spot_diameter_um),
        source=h5ad, counts_file=h5ad,
    ).validate()


def _scalefactors(uns, library_id: str | None) -> dict:
    spatial = uns.get("spatial", {}) if hasattr(uns, "get") else {}
    if not spatial:
        return {}
    library = library_id if library_id is not None else next(iter(spatial))
    return dict(spatial.get(library, {}).get("scalefactors", {}))
