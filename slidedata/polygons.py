"""Nucleus polygons as the integer mask every stage reads: rasterised once, then cached as a zarr array.

Xenium and its readers (spatialdata-io, the vendor's `nucleus_boundaries.parquet`) give nuclei as polygons; the
stages cut patches and measure nuclei from a mask. `polygon_mask` draws the polygons lazily, one chunk at a time
(only the polygons whose bounding box meets the chunk), so a whole slide never sits in memory: mask value `k` is
the `k`-th cell id in order of first appearance (a cell with several polygons, e.g. two nuclei, has one value);
where polygons overlap, the earlier cell keeps the pixel; a pixel belongs to a polygon when its centre is inside.

`rasterised_mask` serves `slidedata.sample.open_sample`: the mask of a shapes element is written once to

    $HE2EXPR_MASK_CACHE (default ~/.cache/he2expr/masks)/<sample>-<digest>.zarr

keyed by a digest of the element's files, the image's shape, the transformation between them and
RASTER_VERSION (any change makes a new entry, so a stale mask is never read), and published atomically
(`slidedata.publish`): concurrent stages never read half a mask. Every chunk is written, background ones too: a
missing chunk would read as a partial copy to the sample's checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import dask.array as da
import numpy as np

from slidedata.chunks import ChunkFiles
from slidedata.errors import DataError
from slidedata.publish import publishing_folder

log = logging.getLogger(__name__)

RASTER_VERSION = "polygons-1"
MASK_CACHE_ENV = "HE2EXPR_MASK_CACHE"
MASK_DTYPE = np.uint32


def mask_cache_dir() -> Path:
    """Where rasterised masks are kept: $HE2EXPR_MASK_CACHE, else ~/.cache/he2expr/masks."""
    return Path(os.environ.get(MASK_CACHE_ENV) or Path.home() / ".cache" / "he2expr" / "masks").expanduser()


def group_polygons(polygons: list[np.ndarray], ids) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(polygons, the mask value of each, the unique ids in order of first appearance): value k = k-th id."""
    ids = np.asarray(ids, dtype=object)
    unique, first, inverse = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # values in order of first appearance, not of the sorted text
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return polygons, rank[inverse.ravel()], ids[np.sort(first)]


def polygon_mask(polygons: list[np.ndarray], values: np.ndarray, shape: tuple[int, int],
                 chunks: tuple[int, int]) -> da.Array:
    """A lazy (H, W) uint32 mask: polygon i (vertices (n, 2) as (x, y) in pixels, pixel j spanning [j, j + 1))
    drawn with value `values[i]`, chunk by chunk."""
    if len(polygons) != len(values):
        raise ValueError(f"{len(polygons)} polygons but {len(values)} values")
    boxes = np.array([[p[:, 1].min(), p[:, 1].max(), p[:, 0].min(), p[:, 0].max()] for p in polygons]
                     ).reshape(-1, 4)
    values = np.asarray(values, dtype=MASK_DTYPE)

    def draw(block_info=None) -> np.ndarray:
        from skimage.draw import polygon as fill

        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        window = np.zeros((y1 - y0, x1 - x0), dtype=MASK_DTYPE)
        meets = np.flatnonzero((boxes[:, 1] >= y0 - 1) & (boxes[:, 0] <= y1) & (boxes[:, 3] >= x0 - 1)
                               & (boxes[:, 2] <= x1))
        for i in meets:
            # skimage fills the pixels whose integer coordinates are inside: shift so those are the pixel centres
            rr, cc = fill(polygons[i][:, 1] - 0.5 - y0, polygons[i][:, 0] - 0.5 - x0, shape=window.shape)
            free = window[rr, cc] == 0
            window[rr[free], cc[free]] = values[i]
        return window

    return da.map_blocks(draw, dtype=MASK_DTYPE, chunks=da.core.normalize_chunks(chunks, shape))


def shapes_polygons(gdf, path: Path, name: str, id_column: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Each polygon's exterior ((n, 2) (x, y) in the element's own coordinates) and its cell id: the `id_column`
    column where there is one (spatialdata-io indexes nuclei by their label and keeps the id there), else the index.
    A multipolygon gives each part with the same id; holes are ignored (a nucleus has none that matters)."""
    ids = gdf[id_column].to_numpy() if id_column in gdf.columns else gdf.index.to_numpy()
    polygons, owners = [], []
    for geometry, owner in zip(gdf.geometry, ids):
        kind = getattr(geometry, "geom_type", type(geometry).__name__)
        parts = list(geometry.geoms) if kind == "MultiPolygon" else [geometry]
        if kind not in ("Polygon", "MultiPolygon"):
            raise DataError(path, name, f"nuclei must be polygons, found a {kind} (cell {owner!r}); circles or "
                                        "points have no outline to cut a nucleus from")
        for part in parts:
            polygons.append(np.asarray(part.exterior.coords, dtype=np.float64)[:, :2])
            owners.append(owner)
    if not polygons:
        raise DataError(path, name, "no polygon in this shapes element")
    return polygons, np.asarray(owners, dtype=object)


def to_pixels(shapes_element, image_element, path: Path, name: str) -> np.ndarray:
    """3x3 affine from the shapes' coordinates to the image's pixels (x, y), through a coordinate system both
    have ('global' first)."""
    from spatialdata.transformations import get_transformation

    shapes_to = get_transformation(shapes_element, get_all=True)
    image_to = get_transformation(image_element, get_all=True)
    common = sorted(set(shapes_to) & set(image_to), key=lambda cs: (cs != "global", cs))
    if not common:
        raise DataError(path, name, f"shares no coordinate system with the image (shapes: {sorted(shapes_to)}, "
                                    f"image: {sorted(image_to)}), so its polygons cannot be placed on it")
    axes = ("x", "y")
    shapes_matrix = shapes_to[common[0]].to_affine_matrix(input_axes=axes, output_axes=axes)
    image_matrix = image_to[common[0]].to_affine_matrix(input_axes=axes, output_axes=axes)
    return np.linalg.inv(image_matrix) @ shapes_matrix


def apply_affine(matrix: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    return points_xy @ matrix[:2, :2].T + matrix[:2, 2]


def rasterised_mask(sdata, path: Path, name: str, image_element, image: da.Array, sample_name: str,
                    id_column: str = "cell_id") -> tuple[da.Array, ChunkFiles | None, np.ndarray]:
    """(the mask of the shapes element `name` on the image's pixels, read from the cache, its chunk files, the
    cell id of each mask value 1..n), rasterised into the cache first if it is not there yet."""
    polygons, owners = shapes_polygons(sdata.shapes[name], path, name, id_column)
    matrix = to_pixels(sdata.shapes[name], image_element, path, name)
    polygons = [apply_affine(matrix, p) for p in polygons]
    polygons, values, ids = group_polygons(polygons, owners)
    shape = tuple(int(n) for n in image.shape[1:])
    chunks = (int(image.chunks[1][0]), int(image.chunks[2][0]))
    target = mask_cache_dir() / f"{sample_name}-{_digest(path / 'shapes' / name, shape, chunks, matrix)[:20]}.zarr"
    if not (target / "zarr.json").exists():
        _write(target, polygon_mask(polygons, values, shape, chunks), path, name)
        log.info("%s: rasterised %d nucleus polygons of %s into %s", path, len(polygons), name, target)
    return da.from_zarr(str(target)), ChunkFiles.find(target), ids


def _write(target: Path, mask: da.Array, path: Path, name: str) -> None:
    import zarr

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with publishing_folder(target, keep_existing=True) as tmp:
            array = zarr.create_array(str(tmp), shape=mask.shape, chunks=tuple(c[0] for c in mask.chunks),
                                      dtype=MASK_DTYPE, fill_value=0, config={"write_empty_chunks": True})
            for index in np.ndindex(*mask.numblocks):
                region = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(mask.chunks, index))
                array[region] = mask.blocks[index].compute(scheduler="synchronous")
    except OSError as exc:
        raise DataError(target, "-", f"cannot write the rasterised mask of {path}/{name} here "
                                     f"({exc.strerror or exc}); point {MASK_CACHE_ENV} at a writable folder") from exc


def _digest(folder: Path, shape: tuple, chunks: tuple, matrix: np.ndarray) -> str:
    digest = hashlib.sha256(f"{RASTER_VERSION}\0{shape}\0{chunks}\0{np.round(matrix, 9).tolist()}".encode())
    for file in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.as_posix()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file.stat().st_size}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
