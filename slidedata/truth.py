"""Held-out truth: the measured expression of held-out nuclei, kept out of the samples.

The challenge's format hides the expression of held-out nuclei (validation and test groups are in the mask and in
`cell_id-group`, never in `anucleus`). Where we hold tissue out ourselves (the spot importer), the measurements go
here instead, one `<sample>.h5ad` per sample in a truth folder, for a scorer (`python -m submission.score`) to read:
laid out like `anucleus` (obs['cell_id'], var = genes, X = log1p(counts / total * 100), layers['counts']) plus
obs['group'] and obs['region'], the held-out region each nucleus belongs to (the official score averages nuclei
within regions, then regions within samples).
"""

from __future__ import annotations

from pathlib import Path

from slidedata.errors import DataError
from slidedata.publish import publishing

TRUTH_FOLDER = "truth"  # beside the sample zarrs: <out>/truth/<sample>.h5ad (sample_paths lists only *.zarr)
REGION = "region"
SUFFIX = ".h5ad"


def truth_path(folder: str | Path, sample: str) -> Path:
    return Path(folder) / f"{sample}{SUFFIX}"


def write_truth(folder: str | Path, sample: str, table) -> Path:
    """Publish `table` (an AnnData with obs 'cell_id', 'group', 'region') as the truth of `sample`."""
    for column in ("cell_id", "group", REGION):
        if column not in table.obs:
            raise ValueError(f"truth table of {sample} has no obs['{column}']")
    table.uns["sample"] = sample
    path = truth_path(folder, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    with publishing(path) as tmp:
        table.write_h5ad(tmp)
    return path


def remove_truth(folder: str | Path, sample: str) -> None:
    """Remove the truth of `sample` where an earlier import left one (it would score against cells that are no
    longer held out)."""
    truth_path(folder, sample).unlink(missing_ok=True)


def read_truth(folder: str | Path) -> dict:
    """sample name -> its truth AnnData, for every `<sample>.h5ad` in `folder`, sorted by name."""
    import anndata as ad

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "-", "no truth folder here (the spot importer writes <out>/truth/ when it holds "
                                     "tissue out: --hold-out-blocks or --hold-out-sections)")
    files = sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))
    if not files:
        raise DataError(folder, "-", f"no <sample>{SUFFIX} truth file in this folder")
    tables = {}
    for path in files:
        try:
            table = ad.read_h5ad(path)
        except Exception as exc:  # h5py and anndata raise many types; the user needs the file name
            raise DataError(path, "-", f"not a readable h5ad ({type(exc).__name__}: {exc})") from exc
        for column in ("cell_id", REGION):
            if column not in table.obs:
                raise DataError(path, "obs", f"no '{column}' column: not a truth table")
        tables[path.stem] = table
    return tables
