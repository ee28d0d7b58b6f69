"""Test helper: a small 10x Xenium output folder in the vendor's own file formats (XOA 2.x names), written from known
cells so that tests can check the import against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

UM = 0.2125  # morphology pixel size
GENES = [f"G{i:02d}" for i in range(12)]
CONTROLS = ["NegControlProbe_00001", "NegControlCodeword_0500"]


@dataclass
class XeniumTruth:
    ids: np.ndarray  # Xenium's string ids, in matrix order
    centres_px: np.ndarray  # (n, 2) (y, x) morphology pixels
    counts: np.ndarray  # (n, genes) of the gene panel
    shape: tuple[int, int]  # morphology (H, W)


def xenium_id(k: int) -> str:
    letters = "".join(chr(ord("a") + (k >> (4 * i)) % 16) for i in reversed(range(8)))
    return f"{letters}-1"


def write_xenium_folder(folder: Path, n_cells: int = 48, seed: int = 0, matrix: str = "h5",
                        radius_px: float = 5.0) -> XeniumTruth:
    """Nuclei on a jittered grid (12-vertex polygons), DAPI bright inside them, Poisson counts whose level follows
    the nucleus's row (so a model has something to learn), control features beside the genes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    columns = 8
    rows = -(-n_cells // columns)
    pitch = 22
    shape = (rows * pitch + 12, columns * pitch + 12)
    k = np.arange(n_cells)
    centres = np.c_[12 + (k // columns) * pitch, 12 + (k % columns) * pitch] + rng.uniform(-3, 3, (n_cells, 2))
    ids = np.array([xenium_id(1000 + 37 * i) for i in k], dtype=object)
    level = 1 + (k // columns)[:, None] * np.linspace(0.2, 2.0, len(GENES))[None]
    counts = rng.poisson(level * 3).astype(np.int32)
    counts[:, 0] += 1  # no cell without counts

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dapi = rng.normal(300, 30, shape)
    for y, x in centres:
        dapi[(yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2 <= radius_px ** 2] += 3000
    import tifffile

    tifffile.imwrite(folder / "morphology_focus.ome.tif", np.clip(dapi, 0, 65535).astype(np.uint16)[None])
    (folder / "experiment.xenium").write_text(json.dumps({"pixel_size": UM, "analysis_sw_version": "xenium-2.0.0"}))

    cells = pd.DataFrame({"cell_id": ids, "x_centroid": centres[:, 1] * UM, "y_centroid": centres[:, 0] * UM,
                          "transcript_counts": counts.sum(axis=1)})
    cells.to_parquet(folder / "cells.parquet")
    angles = np.linspace(0, 2 * np.pi, 13)[:-1]
    boundaries = pd.DataFrame({
        "cell_id": np.repeat(ids, len(angles)),
        "vertex_x": ((centres[:, 1:2] + radius_px * np.cos(angles)[None]) * UM).ravel(),
        "vertex_y": ((centres[:, 0:1] + radius_px * np.sin(angles)[None]) * UM).ravel(),
        "label_id": np.repeat(k + 1, len(angles)),
    })
    boundaries.to_parquet(folder / "nucleus_boundaries.parquet")

    features = GENES + CONTROLS
    kinds = ["Gene Expression"] * len(GENES) + ["Negative Control Probe", "Negative Control Codeword"]
    everything = np.c_[counts, rng.poisson(0.3, (n_cells, len(CONTROLS)))].astype(np.int32)
    write_matrix(folder, ids, features, kinds, everything, matrix)
    return XeniumTruth(ids, centres, counts, shape)


def write_matrix(folder: Path, ids, features, kinds, counts: np.ndarray, kind: str = "h5") -> None:
    """The cell-feature matrix as 10x writes it: features x cells, CSC (h5) or Matrix Market (mtx folder)."""
    from scipy import sparse

    matrix = sparse.csc_matrix(np.asarray(counts).T)
    if kind == "h5":
        import h5py

        with h5py.File(folder / "cell_feature_matrix.h5", "w") as h5:
            m = h5.create_group("matrix")
            m["barcodes"] = np.array([i.encode() for i in ids])
            m["data"], m["indices"], m["indptr"] = matrix.data, matrix.indices, matrix.indptr
            m["shape"] = np.array(matrix.shape, dtype=np.int32)
            f = m.create_group("features")
            f["name"] = np.array([n.encode() for n in features])
            f["id"] = np.array([n.encode() for n in features])
            f["feature_type"] = np.array([t.encode() for t in kinds])
        return
    from scipy.io import mmwrite
    import gzip

    out = folder / "cell_feature_matrix"
    out.mkdir()
    with gzip.open(out / "matrix.mtx.gz", "wb") as handle:
        mmwrite(handle, matrix)
    pd.Series(ids).to_csv(out / "barcodes.tsv.gz", header=False, index=False)
    pd.DataFrame({"id": features, "name": features, "type": kinds}).to_csv(out / "features.tsv.gz", sep="\t",
                                                                            header=False, index=False)


def he_with_alignment(folder: Path, truth: XeniumTruth, scale: float = 0.5, offset=(6.0, 4.0)) -> tuple[Path, Path]:
    """An RGB 'H&E' of the section at 1/`scale` the morphology's resolution, shifted by `offset` morphology pixels
    (x, y), and Xenium Explorer's alignment csv (H&E pixels -> morphology pixels) that says so."""
    from PIL import Image

    matrix = np.array([[scale, 0, offset[0]], [0, scale, offset[1]], [0, 0, 1.0]])
    height, width = (int(np.ceil(n / scale)) for n in truth.shape)
    yy, xx = np.mgrid[:height, :width]
    morph_y, morph_x = (yy + 0.5) * scale + offset[1], (xx + 0.5) * scale + offset[0]
    inside = np.zeros((height, width), dtype=bool)
    for y, x in truth.centres_px:
        inside |= (morph_y - y) ** 2 + (morph_x - x) ** 2 <= 5.0 ** 2
    rgb = np.where(inside[..., None], np.array([90, 60, 150], np.uint8), np.array([235, 200, 225], np.uint8))
    Image.fromarray(rgb.astype(np.uint8)).save(folder / "he.png")
    np.savetxt(folder / "he_alignment.csv", matrix, delimiter=",")
    return folder / "he.png", folder / "he_alignment.csv"
