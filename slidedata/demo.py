"""A synthetic Crunch-format dataset: the real challenge data cannot be downloaded here.

Each sample is a SpatialData zarr with the challenge's element names, dtypes and structure. The tissue is simulated
so that the task is learnable in the same ways as on real colon tissue:

* cell types differ in nuclear morphology (size, elongation, darkness, chromatin texture) and in expression;
* a neighbourhood effect: an "inflammation" gene programme follows the local fraction of lymphocytes, so features
  of neighbouring nuclei help, as tissue context does on real slides;
* counts are sparse (most genes are zero in most cells) and `X = log1p(counts / total * 100)`;
* validation and test nuclei are square tissue regions, not random cells; test nuclei have no row in `anucleus`,
  some train nuclei have none either, and one sample (like DC1) has no expression at all.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from slidedata.sample import N_GENES
from slidedata.writer import anucleus_table, write_sample

# Ruifrok & Johnston optical-density vectors of haematoxylin and eosin (RGB).
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
MICRONS_PER_PIXEL = 0.2125  # Xenium's pixel size, stored with each sample


@dataclass(frozen=True)
class CellType:
    name: str
    radius: float  # px, mean of the two semi-axes
    elongation: float  # major / minor semi-axis
    darkness: float  # haematoxylin density
    granularity: float  # 0 = smooth chromatin, 1 = coarse clumps
    vesicular: float  # pale centre (open chromatin)


CELL_TYPES = (
    CellType("epithelial", 8.0, 1.7, 0.55, 0.3, 0.5),
    CellType("fibroblast", 6.0, 3.0, 0.80, 0.2, 0.0),
    CellType("lymphocyte", 4.5, 1.05, 1.10, 0.1, 0.0),
    CellType("plasma", 5.5, 1.25, 0.85, 0.9, 0.2),
    CellType("macrophage", 9.0, 1.3, 0.40, 0.5, 0.3),
)
# Probability of each cell type in each zone: epithelium, lamina propria, lymphoid aggregate.
ZONE_TYPE_P = np.array([
    [0.85, 0.03, 0.08, 0.02, 0.02],
    [0.05, 0.35, 0.25, 0.20, 0.15],
    [0.02, 0.05, 0.85, 0.05, 0.03],
])
ZONE_DENSITY = np.array([0.75, 0.45, 0.95])  # acceptance of a jittered-grid site
GRID_SPACING = 17.0  # px between candidate nucleus sites


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean unit-variance Gaussian random field, generated at low resolution for speed."""
    step = max(int(sigma // 4), 1)
    small = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / step)
    field = ndimage.zoom(small, step, order=1)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def _gene_programmes(rng: np.random.Generator, n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-rates: shared baseline (n_genes,), per-type markers (n_types, n_genes), inflammation programme."""
    baseline = rng.normal(-1.0, 1.3, n_genes)
    markers = np.zeros((len(CELL_TYPES), n_genes))
    for t in range(len(CELL_TYPES)):
        genes = rng.choice(n_genes, size=max(n_genes // 12, 3), replace=False)
        markers[t, genes] = rng.uniform(1.5, 3.5, len(genes))
    inflammation = np.zeros(n_genes)
    n_programme = max(n_genes // 6, 3)
    inflammation[rng.choice(n_genes, size=n_programme, replace=False)] = rng.uniform(1.0, 2.5, n_programme)
    return baseline, markers, inflammation


def simulate_tissue(n_nuclei: int, seed: int, n_genes: int = N_GENES) -> dict:
    """Image, mask, per-nucleus types and counts of one synthetic sample (all in memory; ~10^5 nuclei max)."""
    rng = np.random.default_rng(seed)
    mean_accept = 0.6 * 0.85  # mean site acceptance times tissue fraction, measured on generated samples
    side = int(np.sqrt(n_nuclei / mean_accept) * GRID_SPACING) + 64
    shape = (side, int(side * 1.1))

    tissue = _smooth_field(rng, shape, side / 6) > -1.1  # a few lumina / gaps
    epithelium = _smooth_field(rng, shape, side / 10) > 0.5
    aggregate = _smooth_field(rng, shape, side / 12) > 1.0
    zone = np.where(aggregate, 2, np.where(epithelium, 0, 1))

    # Candidate sites on a jittered grid; accepted by zone density, so aggregates are crowded.
    gy, gx = np.mgrid[GRID_SPACING / 2 : shape[0] - 8 : GRID_SPACING, GRID_SPACING / 2 : shape[1] - 8 : GRID_SPACING]
    ys = (gy.ravel() + rng.uniform(-0.3, 0.3, gy.size) * GRID_SPACING).clip(8, shape[0] - 9)
    xs = (gx.ravel() + rng.uniform(-0.3, 0.3, gx.size) * GRID_SPACING).clip(8, shape[1] - 9)
    iy, ix = ys.astype(int), xs.astype(int)
    keep = tissue[iy, ix] & (rng.random(len(ys)) < ZONE_DENSITY[zone[iy, ix]])
    ys, xs, site_zone = ys[keep], xs[keep], zone[iy[keep], ix[keep]]
    types = np.array([rng.choice(len(CELL_TYPES), p=ZONE_TYPE_P[z]) for z in site_zone])

    # Non-contiguous ids far above the count, as in the challenge masks.
    cell_ids = np.sort(rng.choice(np.arange(1, 20 * len(ys) + 2), size=len(ys), replace=False)).astype(np.uint32)
    mask = np.zeros(shape, dtype=np.uint32)
    haem = np.zeros(shape, dtype=np.float32)
    fine, coarse = _smooth_field(rng, shape, 0.8), _smooth_field(rng, shape, 2.0)
    for cid, y, x, t in zip(cell_ids, ys, xs, types):
        ct = CELL_TYPES[t]
        r = ct.radius * rng.uniform(0.8, 1.2)
        a, b = r * np.sqrt(ct.elongation), r / np.sqrt(ct.elongation)
        theta = rng.uniform(0, np.pi)
        ext = int(np.ceil(a)) + 1
        y0, y1, x0, x1 = int(y) - ext, int(y) + ext + 1, int(x) - ext, int(x) + ext + 1
        if y0 < 0 or x0 < 0 or y1 > shape[0] or x1 > shape[1]:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - y, xx - x
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        rho = u * u + v * v
        inside = (rho <= 1) & (mask[y0:y1, x0:x1] == 0)
        mask[y0:y1, x0:x1][inside] = cid
        texture = 1 + 0.35 * ((1 - ct.granularity) * fine[y0:y1, x0:x1] + ct.granularity * coarse[y0:y1, x0:x1])
        density = ct.darkness * rng.uniform(0.85, 1.15) * texture * (1 - ct.vesicular * np.exp(-2.5 * rho))
        haem[y0:y1, x0:x1][inside] = density[inside]

    present = np.isin(cell_ids, np.unique(mask))
    cell_ids, ys, xs, types, site_zone = (v[present] for v in (cell_ids, ys, xs, types, site_zone))

    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(1.0, 6.0))
    eosin = np.where(tissue, 0.35 + 0.25 * np.tanh(2 * fibres) + 0.1 * (zone == 0), 0.03).astype(np.float32)
    eosin = np.where(mask > 0, 0.15, eosin)
    haem = np.where(tissue & (mask == 0), 0.05, haem)
    od = haem[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
    od = ndimage.gaussian_filter(od, sigma=(0.7, 0.7, 0))
    rgb = 255 * np.exp(-od) + rng.normal(0, 3, od.shape)
    image = np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1)

    # Expression: type markers + an inflammation programme driven by the lymphocyte fraction around each cell.
    baseline, markers, inflammation = _gene_programmes(np.random.default_rng(12345), n_genes)
    neighbours = cKDTree(np.c_[ys, xs]).query(np.c_[ys, xs], k=min(16, len(ys)))[1]
    lymph_fraction = (types[neighbours[:, 1:]] == 2).mean(axis=1)
    log_rate = (baseline + markers[types] + np.outer(5.0 * lymph_fraction, inflammation)
                + rng.normal(0, 0.3, (len(ys), n_genes)))
    rates = np.exp(log_rate)
    library = rng.lognormal(np.log(120), 0.45, len(ys))
    counts = rng.poisson(rates / rates.sum(axis=1, keepdims=True) * library[:, None]).astype(np.int32)
    return dict(image=image, mask=mask, cell_ids=cell_ids.astype(np.int64), y=ys, x=xs, types=types,
                zone=site_zone, counts=counts, lymph_fraction=lymph_fraction)


def spatial_groups(y: np.ndarray, x: np.ndarray, shape: tuple[int, int], seed: int,
                   n_blocks: int = 4, n_validation: int = 2, n_test: int = 2) -> np.ndarray:
    """Hold out whole square regions: the slide is cut in n_blocks x n_blocks squares, a few go to each group."""
    rng = np.random.default_rng(seed)
    block = np.minimum((y * n_blocks / shape[0]).astype(int), n_blocks - 1) * n_blocks + \
        np.minimum((x * n_blocks / shape[1]).astype(int), n_blocks - 1)
    occupied = np.unique(block)
    chosen = rng.choice(occupied, size=n_validation + n_test, replace=False)
    groups = np.full(len(y), "train", dtype=object)
    groups[np.isin(block, chosen[:n_validation])] = "validation"
    groups[np.isin(block, chosen[n_validation:])] = "test"
    return groups


def expression_table(cell_ids: np.ndarray, counts: np.ndarray, y: np.ndarray, x: np.ndarray):
    """AnnData laid out like the challenge's `anucleus`, genes GENE000..., positions from the centroids (y, x)."""
    genes = [f"GENE{i:03d}" for i in range(counts.shape[1])]
    # Microns and (x, y) order: a different frame from the image on purpose, as in the challenge.
    return anucleus_table(cell_ids, counts, genes, np.c_[x, y] * MICRONS_PER_PIXEL)


def make_demo_sample(path: str | Path, seed: int, n_nuclei: int = 3000, with_expression: bool = True,
                     n_genes: int = N_GENES, unmeasured_train_fraction: float = 0.02,
                     chunk_size: int = 512) -> Path:
    """Simulate and write one sample. Validation nuclei keep their measured expression (a local scoring set);
    test nuclei and a few train nuclei have none."""
    tissue = simulate_tissue(n_nuclei, seed, n_genes)
    shape = tissue["mask"].shape
    groups = spatial_groups(tissue["y"], tissue["x"], shape, seed)
    group_table = pd.DataFrame({"cell_id": tissue["cell_ids"], "group": groups})
    expression = None
    if with_expression:
        rng = np.random.default_rng(seed + 1)
        measured = (groups == "validation") | ((groups == "train") & (rng.random(len(groups)) >= unmeasured_train_fraction))
        # Cells without any count cannot be normalised; Xenium pipelines drop them too.
        measured &= tissue["counts"].sum(axis=1) > 0
        expression = expression_table(tissue["cell_ids"][measured], tissue["counts"][measured],
                                      tissue["y"][measured], tissue["x"][measured])
    return write_sample(path, tissue["image"], tissue["mask"], group_table, expression, chunk_size,
                        microns_per_pixel=MICRONS_PER_PIXEL)


DEMO_SAMPLES = (("demo1", 1, True), ("demo2", 2, True), ("demo0", 3, False))


def make_demo_dataset(folder: str | Path, n_nuclei: int = 3000, seed: int = 0, chunk_size: int = 512,
                      progress: bool = False) -> list[Path]:
    """Two samples with expression and one without (like DC1), deterministic from `seed`."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [make_demo_sample(folder / f"{name}.zarr", seed * 1000 + offset, n_nuclei, with_expr, chunk_size=chunk_size)
            for name, offset, with_expr in tqdm(DEMO_SAMPLES, desc="demo samples", disable=not progress)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="folder for the <sample>.zarr files")
    parser.add_argument("--n-nuclei", type=int, default=3000, help="approximate nuclei per sample (up to ~10^5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=512, help="zarr chunk edge of image and mask, px")
    args = parser.parse_args(argv)
    for path in make_demo_dataset(args.out, args.n_nuclei, args.seed, args.chunk_size, progress=True):
        print(path)


if __name__ == "__main__":
    main()
