"""Import a 10x Xenium output folder (Xenium Onboard Analysis) as one sample zarr the stages read.

    he2expr import xenium --src output-XETG.../ --out data/xenium [--he-image he.ome.tif --alignment he_alignment.csv]

Read from the folder, by the names XOA gives them:

* `cells.parquet` (or `cells.csv.gz`): `cell_id` and its centroid in microns (`x_centroid`, `y_centroid`);
* `cell_feature_matrix.h5` (or the `cell_feature_matrix/` folder of matrix.mtx.gz, barcodes.tsv.gz,
  features.tsv.gz): counts per cell; the panel is every 'Gene Expression' feature (control probes and codewords out);
* `nucleus_boundaries.parquet` (or `.csv.gz`): nucleus polygons in microns (`cell_id`, `vertex_x`, `vertex_y`);
* the image: an H&E given with `--he-image` and its alignment (`--alignment`, Xenium Explorer's 3x3 matrix from
  H&E pixels to morphology pixels, as spatialdata-io reads it), else the DAPI of `morphology_focus` (or
  `morphology_focus/morphology_focus_0000.ome.tif`, `morphology_mip.ome.tif`, `morphology.ome.tif`) rendered as a
  virtual haematoxylin stain (no eosin: nuclei only), at the morphology's pixel size (`experiment.xenium`'s
  `pixel_size`, else 0.2125 um).

The nucleus polygons are rasterised onto the image's pixels (`slidedata.polygons`): mask value k is the k-th cell;
`cell_id` keeps Xenium's string ids and `label_id` (the mask value) maps them, so the stages read the sample with
their defaults and every output writes the ids as Xenium gave them. Tissue is held out in spatial blocks
(`importers.hold_out`, as for spot data): held-out cells stay in the mask and in `cell_id-group`, their counts go
to `<out>/truth/<name>.h5ad` for `he2expr score`.

spatialdata-io's `xenium()` reader is not used: it needs `cells.zarr.zip` and `experiment.xenium` (10x's internal
zarr and metadata, which an exported or trimmed folder often lacks) and pulls in scanpy and about 20 more packages;
the documented files above are read with pandas, pyarrow, h5py and tifffile.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from importers.hold_out import HoldOut, add_block_arguments, assign_spots, hold_out_blocks
from importers.spot_readers import read_rgb_image
from slidedata.errors import DataError
from slidedata.polygons import apply_affine, group_polygons, polygon_mask
from slidedata.sample import GROUP_NAMES, LABEL_COLUMN, SAMPLE_SUFFIX
from slidedata.truth import REGION, TRUTH_FOLDER, remove_truth, write_truth
from slidedata.writer import anucleus_table, write_sample

XENIUM_MICRONS_PER_PIXEL = 0.2125  # the morphology image's pixel size on every Xenium instrument so far
GENE_EXPRESSION = "Gene Expression"
CELLS = ("cells.parquet", "cells.csv.gz")
MATRIX = ("cell_feature_matrix.h5", "cell_feature_matrix")
BOUNDARIES = ("nucleus_boundaries.parquet", "nucleus_boundaries.csv.gz")
MORPHOLOGY = ("morphology_focus.ome.tif", "morphology_focus/morphology_focus_0000.ome.tif", "morphology_mip.ome.tif",
              "morphology.ome.tif")
SPECS = "experiment.xenium"
# skimage's haematoxylin optical density per (R, G, B): the colour the DAPI is rendered in
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
MAX_OD = 1.2  # optical density of the brightest DAPI (its 99.5th percentile): dark purple, not black


@dataclass
class XeniumReport:
    name: str
    path: Path
    cells: int
    genes: int
    held_out: int
    off_image: int  # cells whose nucleus the alignment puts outside the H&E (left out)
    microns_per_pixel: float
    image: str  # 'H&E' or 'morphology (virtual haematoxylin)'
    without_nucleus: int = 0  # cells of the matrix without a nucleus polygon, left out where asked to

    def line(self) -> str:
        held = f" ({self.held_out} held out)" if self.held_out else ""
        off = f", {self.off_image} off the image left out" if self.off_image else ""
        off += f", {self.without_nucleus} without a nucleus left out" if self.without_nucleus else ""
        return (f"{self.name}: {self.cells} cells{held}{off}, {self.genes} genes, {self.microns_per_pixel:.4f} um/px "
                f"on the {self.image} -> {self.path}")


# ------------------------------------------------------------------------------------------------------ reading

def find_file(src: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (src / name).exists():
            return src / name
    raise DataError(src / names[0], "-", f"missing: the {what} of a Xenium output folder (looked for "
                                         f"{', '.join(names)} in {src})")


def _text_ids(values) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A Parquet or CSV(.gz) table with at least `columns`; cell ids as text (XOA stores bytes in Parquet)."""
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types; the user needs the file name
        raise DataError(path, "-", f"unreadable table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, "-", f"no column(s) {missing} (columns: {list(frame.columns)})")
    frame["cell_id"] = _text_ids(frame["cell_id"].to_numpy())
    return frame


def read_matrix(path: Path) -> tuple[np.ndarray, list[str], sparse.csr_matrix]:
    """(cell ids, gene names, cells x genes counts) of the 'Gene Expression' features of a 10x matrix (h5 or mtx)."""
    try:
        if path.is_dir():
            from scipy.io import mmread

            counts = sparse.csr_matrix(mmread(path / "matrix.mtx.gz")).T.tocsr()
            cells = pd.read_csv(path / "barcodes.tsv.gz", header=None, sep="\t")[0].to_numpy()
            features = pd.read_csv(path / "features.tsv.gz", header=None, sep="\t")
            names, kinds = features[1].astype(str).to_numpy(), features[2].astype(str).to_numpy()
        else:
            import h5py

            with h5py.File(path, "r") as h5:
                m = h5["matrix"]
                n_features, n_cells = (int(n) for n in m["shape"][:])
                counts = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]),
                                           shape=(n_features, n_cells)).T.tocsr()
                cells = m["barcodes"][:]
                names, kinds = _text_ids(m["features"]["name"][:]), _text_ids(m["features"]["feature_type"][:])
    except Exception as exc:  # h5py, scipy and pandas raise many types; the user needs the file name
        raise DataError(path, "-", f"not a readable 10x cell-feature matrix ({type(exc).__name__}: {exc})") from exc
    genes = kinds == GENE_EXPRESSION
    if not genes.any():
        raise DataError(path, "-", f"no '{GENE_EXPRESSION}' feature (types: {sorted(set(kinds))})")
    names = [str(n) for n in names[genes]]
    if len(set(names)) != len(names):
        raise DataError(path, "-", "gene names are not unique")
    return _text_ids(cells), names, counts[:, np.flatnonzero(genes)].astype(np.int32)


def read_boundaries(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """(polygons (n, 2) as (x, y) in microns, the cell id of each), in file order."""
    frame = read_table(path, ("cell_id", "vertex_x", "vertex_y"))
    ids = frame["cell_id"].to_numpy()
    # XOA writes each polygon's vertices together; a cell with two nuclei (XOA 2) has one label_id per polygon
    polygon = frame["label_id"].to_numpy() if "label_id" in frame.columns else ids
    starts = np.flatnonzero(np.r_[True, (ids[1:] != ids[:-1]) | (polygon[1:] != polygon[:-1])])
    xy = frame[["vertex_x", "vertex_y"]].to_numpy(np.float64)
    polygons = np.split(xy, starts[1:])
    if min(len(p) for p in polygons) < 3:
        raise DataError(path, "-", "a nucleus polygon has fewer than 3 vertices")
    return polygons, ids[starts]


def morphology_pixel_size(src: Path) -> float:
    specs = src / SPECS
    if specs.exists():
        try:
            return float(json.loads(specs.read_text())["pixel_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(specs, "pixel_size", f"unreadable ({type(exc).__name__}: {exc})") from exc
    return XENIUM_MICRONS_PER_PIXEL


def read_alignment(path: Path) -> np.ndarray:
    """Xenium Explorer's alignment: a 3x3 affine (comma separated, no header) from H&E pixels to morphology pixels."""
    try:
        matrix = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except FileNotFoundError:
        raise DataError(path, "-", "alignment file not found") from None
    except ValueError as exc:
        raise DataError(path, "-", f"not a 3x3 matrix of numbers ({exc})") from exc
    if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0, 0, 1]) or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise DataError(path, "-", f"expected an invertible 3x3 affine matrix with last row 0, 0, 1, got "
                                   f"{matrix.tolist()}")
    return matrix


def virtual_haematoxylin(dapi: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8: DAPI intensity as haematoxylin optical density (Beer-Lambert), nuclei purple on white."""
    dapi = dapi.astype(np.float32)
    top = float(np.percentile(dapi, 99.5)) or 1.0
    density = np.clip(dapi / top, 0, 1) * MAX_OD
    return np.round(255 * np.exp(-HAEMATOXYLIN_OD[:, None, None] * density[None])).astype(np.uint8)


def read_morphology(path: Path) -> np.ndarray:
    """The first channel (DAPI) of the morphology OME-TIFF at full resolution, (H, W)."""
    import tifffile

    try:
        pixels = tifffile.imread(path, series=0, level=0)
    except Exception as exc:  # tifffile raises many types; the user needs the file name
        raise DataError(path, "-", f"unreadable image ({type(exc).__name__}: {exc})") from exc
    while pixels.ndim > 2:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise DataError(path, "-", f"expected a (channels,) H x W image, got shape {pixels.shape}")
    return pixels


# ------------------------------------------------------------------------------------------------------- import

def import_xenium(src: str | Path, out_dir: str | Path, name: str | None = None, he_image: Path | None = None,
                  alignment: Path | None = None, hold_out: HoldOut | None = None, group: str = "train",
                  chunk_size: int = 512, drop_cells_without_nucleus: bool = False) -> XeniumReport:
    """Write `<out_dir>/<name>.zarr` (name: the folder's) from the Xenium output folder `src` (module docstring).

    Cells of the matrix without a nucleus polygon (XOA 2's cells found by the boundary stain alone) have no
    nucleus to predict from: refused (DataError naming the boundaries file: often files of two runs), or left out
    and counted with `drop_cells_without_nucleus`."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise DataError(src, "-", "not a folder (a Xenium output folder holds cells.parquet, "
                                  "cell_feature_matrix.h5, nucleus_boundaries.parquet, morphology_focus)")
    if (he_image is None) != (alignment is None):
        raise ValueError("give the H&E image and its alignment together")
    if group not in GROUP_NAMES:
        raise ValueError(f"group must be one of {GROUP_NAMES}, got {group!r}")
    name = name or src.name
    cells_file = find_file(src, CELLS, "cell table")
    matrix_file = find_file(src, MATRIX, "cell-feature matrix")
    boundaries_file = find_file(src, BOUNDARIES, "nucleus boundaries")
    morphology_file = None if he_image is not None else find_file(src, MORPHOLOGY, "morphology image")
    cells = read_table(cells_file, ("cell_id", "x_centroid", "y_centroid")).set_index("cell_id")
    ids, genes, counts = read_matrix(matrix_file)
    polygons, owners = read_boundaries(boundaries_file)
    with_nucleus = np.isin(ids, owners)
    if drop_cells_without_nucleus:
        ids, counts = ids[with_nucleus], counts[with_nucleus]
    _check_ids(ids, owners, cells.index, matrix_file, boundaries_file, cells_file)
    morphology_um = morphology_pixel_size(src)

    # microns -> image pixels: the morphology's own grid, or through the alignment onto the H&E's
    to_pixels = np.diag([1 / morphology_um, 1 / morphology_um, 1.0])
    if he_image is not None:
        matrix = read_alignment(alignment)
        to_pixels = np.linalg.inv(matrix) @ to_pixels
        image = np.moveaxis(read_rgb_image(he_image), -1, 0)
        microns_per_pixel = morphology_um * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    else:
        image = virtual_haematoxylin(read_morphology(morphology_file))
        microns_per_pixel = morphology_um
    polygons = [apply_affine(to_pixels, p) for p in polygons]
    keep_polygon = _on_image(polygons, image.shape[1:])
    kept_cells = pd.Index(owners[keep_polygon]).unique()
    on_image = np.isin(ids, kept_cells)
    if on_image.sum() * 2 < len(ids):
        source = alignment if he_image is not None else morphology_file
        raise DataError(source, "-", f"{int((~on_image).sum())} of {len(ids)} nuclei fall outside the "
                                     f"{image.shape[2]} x {image.shape[1]} px image: "
                                     + ("the alignment maps the tissue off the H&E (a matrix for another image, "
                                        "or inverted?)" if he_image is not None else "not this folder's image?"))
    ids, counts = ids[on_image], counts[on_image]
    in_panel = np.isin(owners, ids) & keep_polygon
    polygons, values, label_ids = group_polygons([p for p, k in zip(polygons, in_panel) if k], owners[in_panel])
    label_of = pd.Series(np.arange(1, len(label_ids) + 1), index=label_ids)
    labels = label_of.reindex(ids).to_numpy(np.int64)
    mask = polygon_mask(polygons, values, image.shape[1:], (chunk_size, chunk_size))

    centres_um = cells.loc[ids, ["y_centroid", "x_centroid"]].to_numpy(np.float64)
    assignment = assign_spots(name, centres_um, hold_out, str(cells_file))
    cell_group = assignment.group if hold_out is not None and hold_out.active else np.full(len(ids), group, object)
    held = cell_group != "train"
    dense_counts = counts.toarray()
    spatial = centres_um[:, ::-1]
    kept = ~held
    expression = (anucleus_table(ids[kept], dense_counts[kept], genes, spatial[kept],
                                 extra_obs={LABEL_COLUMN: labels[kept]}) if kept.any() else None)
    groups = pd.DataFrame({"cell_id": ids, "group": cell_group, LABEL_COLUMN: labels})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_sample(out_dir / f"{name}{SAMPLE_SUFFIX}", image, mask, groups, expression, chunk_size,
                        microns_per_pixel=microns_per_pixel)
    truth = out_dir / TRUTH_FOLDER
    if held.any():
        write_truth(truth, name, anucleus_table(ids[held], dense_counts[held], genes, spatial[held], extra_obs={
            LABEL_COLUMN: labels[held], "group": cell_group[held].astype(str),
            REGION: assignment.region[held].astype(str)}))
    else:
        remove_truth(truth, name)
    return XeniumReport(name, path, len(ids), len(genes), int(held.sum()), int((~on_image).sum()), microns_per_pixel,
                        "H&E" if he_image is not None else "morphology (virtual haematoxylin)",
                        int((~with_nucleus).sum()) if drop_cells_without_nucleus else 0)


def _check_ids(matrix_ids: np.ndarray, polygon_ids: np.ndarray, cell_ids: pd.Index, matrix_file: Path,
               boundaries_file: Path, cells_file: Path) -> None:
    if len(pd.unique(matrix_ids)) != len(matrix_ids):
        raise DataError(matrix_file, "barcodes", "cell ids are not unique")
    for ids_file, known, where in ((boundaries_file, polygon_ids, "has no nucleus polygon"),
                                   (cells_file, cell_ids, "has no row (no centroid)")):
        missing = matrix_ids[~pd.Index(matrix_ids).isin(pd.Index(known))]
        if len(missing):
            hint = " (cells without a nucleus: --drop-cells-without-nucleus)" if ids_file == boundaries_file else ""
            raise DataError(ids_file, "cell_id", f"{len(missing)} of the {len(matrix_ids)} cells of {matrix_file.name} "
                                                 f"{where} here, e.g. {list(missing[:5])}: files of another run?"
                                                 f"{hint}")


def _on_image(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Per polygon: its centre (mean vertex) lies on the image."""
    centres = np.array([p.mean(axis=0) for p in polygons])
    return (centres[:, 0] >= 0) & (centres[:, 0] < shape[1]) & (centres[:, 1] >= 0) & (centres[:, 1] < shape[0])


# ---------------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None, prog: str = "he2expr import xenium") -> int:
    from slidedata.cli import (SAMPLES_KEPT, DefaultsHelpFormatter, StageParser, add_output_flags, positive_int,
                               run_reporting_input_errors)
    from slidedata.publish import check_writable

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="the Xenium output folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.zarr (and truth/)")
    parser.add_argument("--name", help="the sample's name (default: the folder's)")
    parser.add_argument("--he-image", type=Path, help="a post-run H&E of the section (TIFF, JPEG, PNG; RGB)")
    parser.add_argument("--alignment", type=Path, help="its alignment: Xenium Explorer's 3x3 matrix csv from H&E "
                                                       "pixels to morphology pixels")
    parser.add_argument("--group", choices=GROUP_NAMES, default="train", help="group of every imported cell")
    parser.add_argument("--chunk-size", type=positive_int, default=512, help="zarr chunk edge of image and mask, px")
    parser.add_argument("--drop-cells-without-nucleus", action="store_true",
                        help="leave out cells of the matrix that have no nucleus polygon (default: refuse them)")
    add_block_arguments(parser, "the cells")
    add_output_flags(parser)
    args = parser.parse_args(argv)
    if (args.he_image is None) != (args.alignment is None):
        parser.error("give --he-image and --alignment together")
    hold_out = hold_out_blocks(args)
    if hold_out.active and args.group != "train":
        parser.error("--hold-out-blocks leaves the other cells in group train: drop --group")

    def stage() -> int:
        check_writable(args.out)
        report = import_xenium(args.src, args.out, args.name, args.he_image, args.alignment, hold_out, args.group,
                               args.chunk_size, args.drop_cells_without_nucleus)
        print(report.line())
        if report.held_out:
            print(f"{report.held_out} cells held out; their measured expression: {args.out / TRUTH_FOLDER}")
        return 0

    return run_reporting_input_errors(stage, args, interrupted=SAMPLES_KEPT)


if __name__ == "__main__":
    sys.exit(main())
