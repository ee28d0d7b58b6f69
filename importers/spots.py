"""Import spot-level spatial transcriptomics (her2st folders, HEST-1k / Visium h5ad) into the challenge's format.

Each section becomes one sample zarr (`<section>.zarr`) that the rest of the pipeline reads unchanged:
`HE_original` is the full-resolution H&E, `anucleus` holds the measured expression, the pixel size is stored.
Cells are made in one of two ways:

* `spot`   — each spot is one cell: a disc of the spot's diameter in `HE_nuc_original`, ids 1..n;
* `nuclei` — nuclei segmented inside each spot disc (`importers.spot_nuclei`), each inheriting its spot's counts.

Either way `obs['spot_id']` names each cell's spot, in `anucleus` and in `cell_id-group` (read it back with
`read_spot_ids`), so predictions can be averaged back to spots. The gene panel is shared by the sections imported
together: an explicit list, or the `n_genes` most expressed genes common to all of them. Spots whose total count
over all genes is below `min_counts` are defective array positions and are dropped, not normalised. Tissue can be
held out (`importers.hold_out`: whole sections, or spatial blocks of each), as the challenge does: in the mask, not
in `anucleus`, the measurements in `<out>/truth/` for `python -m submission.score`.

    python -m importers.spots her2st --src ../shared/data/her2st --out data/her2st/spot --cells spot
    python -m importers.spots her2st --sections B4 C2 --out DIR --hold-out-blocks 0.25
    python -m importers.spots h5ad --h5ad X.h5ad --image X.tif --out DIR --microns-per-pixel 0.5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from importers.hold_out import HoldOut, add_block_arguments, assign_spots, hold_out_blocks
from importers.spot_nuclei import NucleusSegmentation, segment_spot_nuclei
from importers.spot_readers import HER2ST_COUNTS, SpotSection, read_h5ad_section, read_her2st_section
from slidedata.cli import StageParser, positive_float, positive_int
from slidedata.errors import DataError
from slidedata.progress import progress_bar
from slidedata.sample import CHALLENGE_N_GENES, GROUP_NAMES, GROUPS, SAMPLE_SUFFIX
from slidedata.tables import SampleTables
from slidedata.truth import REGION, TRUTH_FOLDER, remove_truth, write_truth
from slidedata.writer import anucleus_table, write_sample

CELL_MODES = ("spot", "nuclei")
# her2st: defective array positions hold 1-3 reads in total, the smallest real spots ~100 (C2) to ~150 (B4); 10
# sits in that gap (about its geometric middle) and is far below every real spot's depth.
DEFAULT_MIN_COUNTS = 10


@dataclass
class SectionReport:
    """What one imported section became."""

    name: str
    path: Path
    spots_read: int
    spots_dropped: int  # total count below min_counts
    spots_kept: int
    cells: int
    genes: int
    microns_per_pixel: float
    held_out: int = 0  # cells in 'validation' or 'test', their expression in the truth folder instead

    def line(self) -> str:
        held = f" ({self.held_out} held out)" if self.held_out else ""
        return (f"{self.name}: {self.spots_kept} spots kept, {self.spots_dropped} dropped (of {self.spots_read}), "
                f"{self.cells} cells{held}, {self.genes} genes, {self.microns_per_pixel:.4f} um/px -> {self.path}")


# ------------------------------------------------------------------------------------------------ spots, genes

def drop_defective_spots(section: SpotSection, min_counts: int = DEFAULT_MIN_COUNTS) -> tuple[SpotSection, int]:
    """The section without spots whose total count over all genes is below `min_counts`, and how many were dropped."""
    keep = section.total_counts() >= min_counts
    return (section if keep.all() else section.subset(keep)), int((~keep).sum())


def mean_expression_fractions(section: SpotSection) -> pd.Series:
    """Per gene, the mean over spots of count / spot total (over all genes): a depth-free expression level."""
    totals = np.maximum(section.total_counts(), 1).astype(np.float64)
    counts = sparse.csr_matrix(section.counts, dtype=np.float64)
    fractions = sparse.diags(1 / totals) @ counts
    return pd.Series(np.asarray(fractions.mean(axis=0)).ravel(), index=section.genes)


def choose_gene_panel(sections: Sequence[SpotSection], genes: Sequence[str] | None = None,
                      n_genes: int | None = None, ranked: Sequence[SpotSection] | None = None) -> list[str]:
    """The given gene list (every entry checked in every section), else the `n_genes` most expressed genes common
    to all sections. Asking for more genes than they have in common is an error naming both numbers (a silently
    smaller panel than asked would only be found later); by default (None) the panel is the CHALLENGE_N_GENES
    (460) most expressed, or every common gene where there are fewer: the pipeline takes any panel, but spot data
    covers the whole transcriptome (~20,000 genes), which would multiply the fit's memory and time.

    Rank: mean over sections (`ranked`, default all; the importer passes the training spots only, so held-out
    measurements do not choose the genes) of each section's mean per-spot expression fraction (count / spot total).
    Sections weigh equally whatever their sequencing depth (her2st's B4 has ~15x fewer reads than C2-C4; summing
    raw counts would let the deep sections choose alone). Ties go to the gene name, so the panel is deterministic.
    """
    if genes is not None:
        genes = [str(g) for g in genes]
        for section in sections:
            missing = [g for g in genes if g not in set(section.genes)]
            if missing:
                raise DataError(section.counts_file or section.source, "genes",
                                f"{len(missing)} gene(s) of the requested panel are absent, e.g. {missing[:5]}")
        return genes
    if n_genes is not None and n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}")
    common = set(sections[0].genes).intersection(*(s.genes for s in sections[1:]))
    files = ", ".join(str(s.counts_file or s.source) for s in sections)
    if not common:
        raise DataError(files, "genes", "no gene is common to all sections")
    if n_genes is None:
        n_genes = min(CHALLENGE_N_GENES, len(common))
    elif n_genes > len(common):
        raise DataError(files, "genes", f"a panel of {n_genes} genes was asked for (--n-genes), but only "
                                        f"{len(common)} genes are common to all sections: ask for at most that many")
    ranked = list(ranked) if ranked else list(sections)
    score = sum(mean_expression_fractions(s).reindex(sorted(common)) for s in ranked) / len(ranked)
    return sorted(common, key=lambda g: (-score[g], g))[:n_genes]


def panel_counts(section: SpotSection, panel: Sequence[str]) -> np.ndarray:
    """(spots, panel genes) int32 counts, in panel order."""
    columns = pd.Index(section.genes).get_indexer(list(panel))
    counts = section.counts[:, columns]
    return np.asarray(counts.toarray() if sparse.issparse(counts) else counts, dtype=np.int32)


# ------------------------------------------------------------------------------------------------------- cells

def spot_disc_mask(shape: tuple[int, int], centres: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint32 mask with one disc per spot (ids 1..n in spot order) and the spot index of each id.

    Where discs overlap, the earlier spot keeps the pixels; a spot left without any pixel (same centre as an
    earlier one) gets no id.
    """
    height, width = shape
    mask = np.zeros(shape, dtype=np.uint32)
    spot_of_cell: list[int] = []
    for spot, (y, x) in enumerate(centres):
        y0, y1 = max(int(np.floor(y - radius_px)), 0), min(int(np.ceil(y + radius_px)) + 1, height)
        x0, x1 = max(int(np.floor(x - radius_px)), 0), min(int(np.ceil(x + radius_px)) + 1, width)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        window = mask[y0:y1, x0:x1]
        disc = ((yy - y) ** 2 + (xx - x) ** 2 <= radius_px ** 2) & (window == 0)
        if disc.any():
            window[disc] = len(spot_of_cell) + 1
            spot_of_cell.append(spot)
    return mask, np.asarray(spot_of_cell, dtype=np.int64)


def expression_table(cell_ids: np.ndarray, spot_ids: Sequence[str], counts: np.ndarray, panel: Sequence[str],
                     centres_xy_um: np.ndarray, extra_obs: dict | None = None):
    """AnnData laid out like `anucleus`, plus `obs['spot_id']` (and `extra_obs`); `obsm['spatial']` is the spot
    centre (x, y) in um."""
    return anucleus_table(cell_ids, counts, [str(g) for g in panel], centres_xy_um,
                          extra_obs={"spot_id": pd.Series(spot_ids, dtype=str).to_numpy(), **(extra_obs or {})})


def section_cells(section: SpotSection, image: np.ndarray, cells: str,
                  segmentation: NucleusSegmentation | None = None, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mask and the spot index of every cell id, for one section whose image is already loaded."""
    if cells == "spot":
        return spot_disc_mask(image.shape[:2], section.centres_px, section.spot_radius_px)
    if cells == "nuclei":
        return segment_spot_nuclei(image, section.centres_px, section.spot_radius_px, section.microns_per_pixel,
                                   segmentation or NucleusSegmentation(), progress=progress,
                                   desc=f"{section.name}: nuclei")
    raise ValueError(f"cells must be one of {CELL_MODES}, got {cells!r}")


# ------------------------------------------------------------------------------------------------------ import

def import_sections_report(sections: Sequence[SpotSection], out_dir: str | Path, cells: str = "spot",
                           genes: Sequence[str] | None = None, n_genes: int | None = None,
                           min_counts: int = DEFAULT_MIN_COUNTS, chunk_size: int = 512, group: str = "train",
                           segmentation: NucleusSegmentation | None = None, progress: bool = False,
                           hold_out: HoldOut | None = None) -> list[SectionReport]:
    """`import_sections`, returning what each section became (spots kept and dropped, cells, genes)."""
    if cells not in CELL_MODES:
        raise ValueError(f"cells must be one of {CELL_MODES}, got {cells!r}")
    if group not in GROUP_NAMES:
        raise ValueError(f"group must be one of {GROUP_NAMES}, got {group!r}")
    if not sections:
        raise ValueError("no section to import")
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise ValueError(f"section names must be unique (they name the samples), got {names}")
    holding_out = hold_out is not None and hold_out.active
    if holding_out and group != "train":
        raise ValueError(f"holding tissue out leaves the other cells in group 'train', not {group!r}")
    unknown = sorted(set(hold_out.sections) - set(names)) if holding_out else []
    if unknown:
        raise ValueError(f"no section named {unknown} to hold out (sections: {names})")
    filtered = [drop_defective_spots(s, min_counts) for s in sections]
    for section, _ in filtered:
        if section.n_spots == 0:
            raise DataError(section.counts_file or section.source, "counts",
                            f"no spot has at least {min_counts} counts")
    assignments = [assign_spots(s.name, s.centres_px * s.microns_per_pixel, hold_out, str(s.source))
                   for s, _ in filtered]
    training = [s.subset(~a.held_out) for (s, _), a in zip(filtered, assignments) if not a.held_out.all()]
    if not training:
        raise ValueError(f"every section is held out ({names}): nothing would be left to train on")
    panel = choose_gene_panel([s for s, _ in filtered], genes, n_genes, ranked=training)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for (section, dropped), original, assignment in zip(
            progress_bar(filtered, desc=f"import ({cells})", enabled=progress), sections, assignments):
        image = section.load_image()  # one section's pixels in memory at a time
        mask, spot_of_cell = section_cells(section, image, cells, segmentation, progress)
        cell_ids = np.arange(1, len(spot_of_cell) + 1, dtype=np.int64)
        spot_ids = np.asarray([section.spot_ids[i] for i in spot_of_cell], dtype=object)
        centres_xy_um = section.centres_px[spot_of_cell][:, ::-1] * section.microns_per_pixel
        counts = panel_counts(section, panel)[spot_of_cell]
        cell_group = assignment.group[spot_of_cell] if holding_out else np.full(len(cell_ids), group, dtype=object)
        held = cell_group != "train" if holding_out else np.zeros(len(cell_ids), dtype=bool)
        kept = ~held  # the challenge's format: held-out nuclei are absent from the expression table
        expression = (expression_table(cell_ids[kept], spot_ids[kept], counts[kept], panel, centres_xy_um[kept])
                      if kept.any() else None)
        groups = pd.DataFrame({"cell_id": cell_ids, "group": cell_group, "spot_id": spot_ids})
        path = write_sample(out_dir / f"{section.name}{SAMPLE_SUFFIX}", np.moveaxis(image, -1, 0), mask, groups,
                            expression, chunk_size, microns_per_pixel=section.microns_per_pixel)
        del image, mask
        truth = out_dir / TRUTH_FOLDER
        if held.any():
            write_truth(truth, section.name, expression_table(
                cell_ids[held], spot_ids[held], counts[held], panel, centres_xy_um[held],
                extra_obs={"group": cell_group[held].astype(str), REGION: assignment.region[spot_of_cell][held]
                           .astype(str)}))
        else:
            remove_truth(truth, section.name)
        reports.append(SectionReport(section.name, path, original.n_spots, dropped, section.n_spots,
                                     len(cell_ids), len(panel), section.microns_per_pixel, int(held.sum())))
    return reports


def import_sections(sections: Sequence[SpotSection], out_dir: str | Path, cells: str = "spot",
                    genes: Sequence[str] | None = None, n_genes: int | None = None,
                    min_counts: int = DEFAULT_MIN_COUNTS, chunk_size: int = 512, group: str = "train",
                    segmentation: NucleusSegmentation | None = None, progress: bool = False,
                    hold_out: HoldOut | None = None) -> list[Path]:
    """Write one `<section>.zarr` per section under `out_dir` with a shared gene panel; returns the paths.

    `cells`: 'spot' (one disc-shaped cell per spot) or 'nuclei' (segmented nuclei inheriting their spot's counts).
    Every cell is put in `group` ('train' by default), except those `hold_out` holds out ('validation' or 'test':
    in the mask, not in `anucleus`; their expression in `<out_dir>/truth/<section>.h5ad`, `slidedata.truth`).
    Spots with fewer than `min_counts` counts over all genes are dropped before the panel is chosen.
    """
    return [r.path for r in import_sections_report(sections, out_dir, cells, genes, n_genes, min_counts, chunk_size,
                                                   group, segmentation, progress, hold_out)]


def read_spot_ids(sample_path: str | Path) -> pd.Series:
    """cell_id -> spot_id of an imported sample (from its `cell_id-group` table)."""
    tables = SampleTables(sample_path)
    if GROUPS not in tables:
        raise DataError(sample_path, GROUPS, f"element missing (tables: {tables.names})")
    obs = tables.obs(GROUPS)
    if "spot_id" not in obs:
        raise DataError(sample_path, GROUPS, "no 'spot_id' column: not a sample imported from spot data")
    return pd.Series(obs["spot_id"].astype(str).to_numpy(), index=pd.Index(obs["cell_id"].to_numpy(np.int64),
                                                                             name="cell_id"), name="spot_id")


def her2st_sections(src: str | Path, names: Sequence[str] | None = None,
                    microns_per_pixel: float | None = None) -> list[SpotSection]:
    """The her2st section folders under `src` (each holding counts.tsv.gz), all or those named, sorted."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "-", "her2st folder not found")
    found = sorted(p for p in src.iterdir() if (p / HER2ST_COUNTS).exists())
    if names:
        missing = [n for n in names if not (src / n / HER2ST_COUNTS).exists()]
        if missing:
            raise DataError(src, "-", f"no section folder(s) {missing} (found {[p.name for p in found]})")
        found = [src / n for n in names]
    if not found:
        raise DataError(src, "-", f"no section folder holding {HER2ST_COUNTS}")
    return [read_her2st_section(p, microns_per_pixel) for p in found]


# --------------------------------------------------------------------------------------------------------- CLI

def _parser(prog: str = "python -m importers.spots") -> argparse.ArgumentParser:
    from slidedata.cli import DefaultsHelpFormatter, add_output_flags, non_negative_int

    parser = StageParser(prog=prog, description=__doc__.splitlines()[0],
                         epilog=f"each layout's options: {prog} her2st --help, {prog} h5ad --help")
    layouts = parser.add_subparsers(dest="layout", required=True)
    her2st = layouts.add_parser("her2st", help="her2st section folders (HE.jpg, counts.tsv.gz, spots.tsv)",
                                formatter_class=DefaultsHelpFormatter)
    her2st.add_argument("--src", default="../shared/data/her2st", help="folder of section folders")
    her2st.add_argument("--sections", nargs="+", help="section folder names (default: all found)")
    h5ad = layouts.add_parser("h5ad", help="AnnData with obsm['spatial'] in full-resolution pixels, plus its image",
                              formatter_class=DefaultsHelpFormatter)
    h5ad.add_argument("--h5ad", nargs="+", required=True, type=Path, help="one or more .h5ad files")
    h5ad.add_argument("--image", nargs="+", required=True, type=Path, help="the image of each h5ad, same order")
    h5ad.add_argument("--spot-diameter-um", type=positive_float, help="spot diameter (Visium: 55; legacy ST: 100)")
    h5ad.add_argument("--force-microns-per-pixel", action="store_true",
                      help="use --microns-per-pixel even where the h5ad stores another pixel size")
    for sub in (her2st, h5ad):
        sub.add_argument("--out", required=True, type=Path, help="folder for the <section>.zarr samples")
        sub.add_argument("--cells", choices=CELL_MODES, default="spot",
                         help="spot: one cell per spot, its disc as the nucleus, the spot's counts; nuclei: the "
                              "nuclei segmented inside each spot disc, each given its spot's counts")
        sub.add_argument("--microns-per-pixel", type=positive_float,
                         help="pixel size (default: from the data; her2st: from the spot pitch, which this replaces; "
                              "h5ad: one that disagrees with a stored size is refused)")
        sub.add_argument("--genes-file", type=Path, help="gene panel, one name per line (default: most expressed)")
        sub.add_argument("--n-genes", type=positive_int,
                         help=f"panel size when no --genes-file (default: the {CHALLENGE_N_GENES} most expressed, the "
                              "challenge's panel size, or every common gene where fewer); asking for more genes than "
                              "the sections have in common is an error")
        sub.add_argument("--min-counts", type=non_negative_int, default=DEFAULT_MIN_COUNTS,
                         help="drop spots with fewer counts over all genes (defective array positions)")
        sub.add_argument("--group", choices=GROUP_NAMES, default="train", help="group of every imported cell")
        sub.add_argument("--chunk-size", type=positive_int, default=512, help="zarr chunk edge of image and mask, px")
        held = add_block_arguments(sub, "each other section's spots")
        held.add_argument("--hold-out-sections", nargs="+", default=(), metavar="SECTION",
                          help="these whole sections as test (their samples get no expression)")
        add_output_flags(sub)  # on each layout: they follow the layout's name on the command line
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m importers.spots") -> int:
    from slidedata.cli import SAMPLES_KEPT, run_reporting_input_errors
    from slidedata.publish import check_writable

    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.layout == "h5ad" and len(args.h5ad) != len(args.image):
        parser.error(f"give one --image per --h5ad ({len(args.h5ad)} h5ad, {len(args.image)} images)")
    hold_out = hold_out_blocks(args, tuple(args.hold_out_sections))
    if hold_out.active and args.group != "train":
        parser.error("--hold-out-sections / --hold-out-blocks leave the other cells in group train: drop --group")

    def stage() -> int:
        check_writable(args.out)  # before reading and segmenting the sections
        if args.layout == "her2st":
            sections = her2st_sections(args.src, args.sections, args.microns_per_pixel)
        else:
            sections = [read_h5ad_section(h, i, args.microns_per_pixel, args.spot_diameter_um,
                                          force_microns_per_pixel=args.force_microns_per_pixel)
                        for h, i in zip(args.h5ad, args.image)]
        unknown = sorted(set(hold_out.sections) - {s.name for s in sections})
        if unknown:
            raise DataError(args.src if args.layout == "her2st" else args.h5ad[0], "-",
                            f"--hold-out-sections {unknown}: no such section (found {[s.name for s in sections]})")
        genes = None
        if args.genes_file is not None:
            genes = [g.strip() for g in args.genes_file.read_text().splitlines() if g.strip()]
        reports = import_sections_report(sections, args.out, args.cells, genes, args.n_genes, args.min_counts,
                                         args.chunk_size, args.group, progress=True, hold_out=hold_out)
        for report in reports:
            print(report.line())
        print(f"{len(reports)} section(s), {sum(r.cells for r in reports)} cells, {reports[0].genes} genes "
              f"({args.cells} mode) in {args.out}")
        held = sum(r.held_out for r in reports)
        if held:
            print(f"{held} cells held out; their measured expression: {args.out / TRUTH_FOLDER}")
        return 0

    return run_reporting_input_errors(stage, args, interrupted=SAMPLES_KEPT)


if __name__ == "__main__":
    sys.exit(main())
