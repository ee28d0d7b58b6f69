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

import sys
import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from slidedata.progress import progress_bar
from slidedata.sample import CHALLENGE_N_GENES
from slidedata.writer import anucleus_table, write_sample_tables_after
from synthetic.tissue import CELL_TYPES, LYMPHOCYTE, Scene, demo_shape, make_scene, render_image, render_mask

MICRONS_PER_PIXEL = 0.2125  # Xenium's pixel size, stored with each sample
# The challenge's slides: ~20,000 x 22,000 px, ~200,000 nuclei each (1.67 million over 8 samples).
REAL_SHAPE = (20_000, 22_000)
REAL_NUCLEI = 200_000
# The Crunch 1 zarrs' chunking is not documented anywhere we could read; 4096 px is what spatialdata-io gives Xenium
# images (chunks (1, 4096, 4096)), so it is our assumption. `--chunk-size` changes it.
REAL_CHUNK = 4096
RENDER_TILE = 1024  # px: a chunk is rendered in tiles of at most this edge (bounded float temporaries)
EXPRESSION_BLOCK = 4096  # nuclei per seeded block of expression noise: any subset of rows gets the same values
# The smallest slides the CLI writes: with fewer nuclei or a smaller slide the simulation fails (5 nuclei, 64 px did).
MIN_NUCLEI, MIN_EDGE = 20, 256
# Each cell type's markers and the inflammation programme are drawn as at least 3 distinct genes
# (`_gene_programmes`): a smaller panel cannot hold them.
MIN_GENES = 3


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


def lymphocyte_fraction(scene: Scene, rows: np.ndarray) -> np.ndarray:
    """Fraction of lymphocytes among the 15 nearest other nuclei of each of `rows` (scene indices)."""
    k = min(16, len(scene))
    if k < 2:
        return np.zeros(len(rows))
    sites = np.c_[scene.y, scene.x]
    neighbours = cKDTree(sites).query(sites[rows], k=k)[1]
    return (scene.types[neighbours[:, 1:]] == LYMPHOCYTE).mean(axis=1)


def simulate_counts(scene: Scene, rows: np.ndarray, n_genes: int = CHALLENGE_N_GENES) -> np.ndarray:
    """Sparse counts (len(rows), n_genes) int32: type markers + an inflammation programme driven by the lymphocyte
    fraction around each cell. Drawn in fixed seeded blocks of nuclei, so memory is bounded and a nucleus's counts
    do not depend on which other rows are asked for."""
    baseline, markers, inflammation = _gene_programmes(np.random.default_rng(12345), n_genes)
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), n_genes), dtype=np.int32)
    blocks = rows // EXPRESSION_BLOCK
    wanted_blocks = np.unique(blocks)
    ranges = [np.arange(b * EXPRESSION_BLOCK, min((b + 1) * EXPRESSION_BLOCK, len(scene))) for b in wanted_blocks]
    fraction = np.zeros(len(scene))
    if ranges:  # one neighbour query for all blocks
        everyone = np.concatenate(ranges)
        fraction[everyone] = lymphocyte_fraction(scene, everyone)
    for block, members in zip(wanted_blocks, ranges):
        rng = np.random.default_rng([scene.seed, 5, int(block)])
        log_rate = (baseline + markers[scene.types[members]]
                    + np.outer(5.0 * fraction[members], inflammation)
                    + rng.normal(0, 0.3, (len(members), n_genes)))
        rates = np.exp(log_rate)
        library = rng.lognormal(np.log(120), 0.45, len(members))
        counts = rng.poisson(rates / rates.sum(axis=1, keepdims=True) * library[:, None])
        wanted = blocks == block
        out[wanted] = counts[rows[wanted] - members[0]]
    return out


def simulate_tissue(n_nuclei: int, seed: int, n_genes: int = CHALLENGE_N_GENES) -> dict:
    """Image, mask, per-nucleus types and counts of one small synthetic sample, rendered in one piece in memory."""
    scene = make_scene(demo_shape(n_nuclei), n_nuclei, seed)
    height, width = scene.shape
    mask = render_mask(scene, 0, height, 0, width)
    image = render_image(scene, 0, height, 0, width)
    rows = np.flatnonzero(np.isin(scene.cell_ids, mask))  # a nucleus fully covered by earlier ones is absent
    return dict(image=image, mask=mask, cell_ids=scene.cell_ids[rows].astype(np.int64), y=scene.y[rows],
                x=scene.x[rows], types=scene.types[rows], zone=scene.zone[rows],
                counts=simulate_counts(scene, rows, n_genes), lymph_fraction=lymphocyte_fraction(scene, rows))


def _tiled_array(scene: Scene, channels: int, dtype, chunk_size: int, render, on_block) -> da.Array:
    """(channels, H, W) dask array whose chunks are rendered on demand, each in tiles of at most RENDER_TILE px."""
    height, width = scene.shape

    def block(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((channels, y1 - y0, x1 - x0), dtype=dtype)
        for ty in range(y0, y1, RENDER_TILE):
            for tx in range(x0, x1, RENDER_TILE):
                ty1, tx1 = min(ty + RENDER_TILE, y1), min(tx + RENDER_TILE, x1)
                out[:, ty - y0: ty1 - y0, tx - x0: tx1 - x0] = render(scene, ty, ty1, tx, tx1)
        on_block((y0, x0), out)
        return out

    rows = []
    for y0 in range(0, height, chunk_size):
        y1 = min(y0 + chunk_size, height)
        rows.append([da.from_delayed(dask.delayed(block)(y0, y1, x0, min(x0 + chunk_size, width)),
                                     shape=(channels, y1 - y0, min(x0 + chunk_size, width) - x0), dtype=dtype)
                     for x0 in range(0, width, chunk_size)])
    return da.block([rows])


def real_density_nuclei(height: int, width: int) -> int:
    """About how many nuclei a slide of this size holds at the challenge's density."""
    return int(round(REAL_NUCLEI * height * width / (REAL_SHAPE[0] * REAL_SHAPE[1])))


def make_sample(path: str | Path, seed: int, height: int = REAL_SHAPE[0], width: int = REAL_SHAPE[1],
                n_nuclei: int | None = None, with_expression: bool = True, n_genes: int = CHALLENGE_N_GENES,
                unmeasured_train_fraction: float = 0.02, chunk_size: int = REAL_CHUNK,
                progress: bool = False) -> Path:
    """Simulate and write one sample of any size, chunk by chunk (peak memory independent of the slide's size but
    for the tables). `n_nuclei` defaults to the challenge's density (200,000 nuclei on 20,000 x 22,000 px).
    Validation nuclei keep their measured expression (a local scoring set); test nuclei and a few train nuclei have
    none."""
    if n_nuclei is None:
        n_nuclei = real_density_nuclei(height, width)
    scene = make_scene((height, width), n_nuclei, seed)
    n_blocks = -(-height // chunk_size) * -(-width // chunk_size)
    present: dict[tuple[int, int], np.ndarray] = {}
    lock = threading.Lock()
    bar = progress_bar(total=2 * n_blocks, desc=f"{Path(path).stem}: render", unit="chunk", enabled=progress)

    def mask_done(corner: tuple[int, int], block: np.ndarray) -> None:
        ids = np.unique(block)
        with lock:  # ids of the nuclei present in the mask: only those go into the tables
            present[corner] = ids[ids > 0]
            bar.update()

    def image_done(corner: tuple[int, int], block: np.ndarray) -> None:
        with lock:
            bar.update()

    image = _tiled_array(scene, 3, np.uint8, chunk_size, render_image, image_done)
    mask = _tiled_array(scene, 1, np.uint32, chunk_size, lambda s, *w: render_mask(s, *w)[None], mask_done)[0]

    def tables():
        bar.close()
        if len(present) != n_blocks:
            raise RuntimeError(f"{path}: {len(present)} of {n_blocks} mask chunks were rendered")
        rows = np.flatnonzero(np.isin(scene.cell_ids, np.concatenate(list(present.values()))))
        return sample_tables(scene, rows, seed, with_expression, n_genes, unmeasured_train_fraction)

    return write_sample_tables_after(path, image, mask, tables, chunk_size, microns_per_pixel=MICRONS_PER_PIXEL)


def sample_tables(scene: Scene, rows: np.ndarray, seed: int, with_expression: bool, n_genes: int,
                  unmeasured_train_fraction: float):
    """(cell_id-group frame, anucleus AnnData or None) for the nuclei `rows` of the scene present in the mask."""
    cell_ids = scene.cell_ids[rows].astype(np.int64)
    y, x = scene.y[rows], scene.x[rows]
    groups = spatial_groups(y, x, scene.shape, seed)
    group_table = pd.DataFrame({"cell_id": cell_ids, "group": groups})
    if not with_expression:
        return group_table, None
    rng = np.random.default_rng(seed + 1)
    measured = (groups == "validation") | ((groups == "train") & (rng.random(len(groups)) >= unmeasured_train_fraction))
    counts = simulate_counts(scene, rows[measured], n_genes)
    # Cells without any count cannot be normalised; Xenium pipelines drop them too.
    counted = counts.sum(axis=1) > 0
    chosen = np.flatnonzero(measured)[counted]
    return group_table, expression_table(cell_ids[chosen], counts[counted], y[chosen], x[chosen])


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
                     n_genes: int = CHALLENGE_N_GENES, unmeasured_train_fraction: float = 0.02,
                     chunk_size: int = 512) -> Path:
    """One demo sample: the demo's tissue geometry (17 px between nucleus sites) for about `n_nuclei` nuclei."""
    height, width = demo_shape(n_nuclei)
    return make_sample(path, seed, height, width, n_nuclei, with_expression, n_genes, unmeasured_train_fraction,
                       chunk_size)


DEMO_SAMPLES = (("demo1", 1, True), ("demo2", 2, True), ("demo0", 3, False))


def make_demo_dataset(folder: str | Path, n_nuclei: int = 3000, seed: int = 0, chunk_size: int = 512,
                      progress: bool = False, n_genes: int = CHALLENGE_N_GENES) -> list[Path]:
    """Two samples with expression and one without (like DC1), deterministic from `seed`, sharing one panel of
    `n_genes` genes (GENE000...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [make_demo_sample(folder / f"{name}.zarr", seed * 1000 + offset, n_nuclei, with_expr, n_genes,
                             chunk_size=chunk_size)
            for name, offset, with_expr in progress_bar(DEMO_SAMPLES, desc="demo samples", enabled=progress)]


def main(argv: list[str] | None = None, prog: str = "python -m synthetic.demo") -> int:
    from slidedata.cli import (SAMPLES_KEPT, DefaultsHelpFormatter, StageParser, add_output_flags, int_at_least,
                               non_negative_int, positive_int, run_reporting_input_errors)
    from slidedata.publish import check_writable

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="folder for the <sample>.zarr files")
    parser.add_argument("--size", choices=("demo", "real"), default="demo",
                        help="demo: three small samples (two with expression, one without); real: one sample of the "
                             f"challenge's size ({REAL_SHAPE[0]:,} x {REAL_SHAPE[1]:,} px, ~{REAL_NUCLEI:,} nuclei, "
                             f"{REAL_CHUNK} px chunks), written chunk by chunk")
    parser.add_argument("--n-nuclei", type=int_at_least(MIN_NUCLEI), default=None,
                        help="approximate nuclei per sample (demo: 3000; real: the challenge's density)")
    parser.add_argument("--height", type=int_at_least(MIN_EDGE), default=REAL_SHAPE[0],
                        help="--size real: slide height, px")
    parser.add_argument("--width", type=int_at_least(MIN_EDGE), default=REAL_SHAPE[1],
                        help="--size real: slide width, px")
    parser.add_argument("--name", default="UC1_I", help="--size real: the sample's name")
    parser.add_argument("--no-expression", action="store_true", help="--size real: no anucleus table (like DC1)")
    parser.add_argument("--n-genes", type=int_at_least(MIN_GENES), default=CHALLENGE_N_GENES,
                        help="genes in the panel (GENE000...), the same in every sample")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the same seed writes the same data")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help=f"zarr chunk edge of image and mask, px (demo: 512; real: {REAL_CHUNK})")
    add_output_flags(parser)
    args = parser.parse_args(argv)

    def stage() -> int:
        check_writable(args.out)  # before minutes of rendering
        if args.size == "real":
            print(make_sample(Path(args.out) / f"{args.name}.zarr", args.seed, args.height, args.width, args.n_nuclei,
                              with_expression=not args.no_expression, n_genes=args.n_genes,
                              chunk_size=args.chunk_size or REAL_CHUNK, progress=True))
            return 0
        for path in make_demo_dataset(args.out, args.n_nuclei or 3000, args.seed, args.chunk_size or 512,
                                      progress=True, n_genes=args.n_genes):
            print(path)
        return 0

    return run_reporting_input_errors(stage, args, interrupted=SAMPLES_KEPT)


if __name__ == "__main__":
    sys.exit(main())
