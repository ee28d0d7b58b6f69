"""Any gene panel: the panel comes from the data (here 377 genes, the real Xenium pancreas crops' size), runs through
every stage and the challenge's interface, and is saved with the model; samples with different panels are refused
naming the file and the first difference."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slidedata import DataError, open_sample, open_samples
from tests.conftest import FIXTURE_PATCH_SIZES, SMALL_FIXTURE_NUCLEI

N_PANEL = 377  # not the challenge's 460: nothing may assume it
PATCH_ARGS = [str(s) for s in FIXTURE_PATCH_SIZES]
MODELS = ("mean-profile", "ridge")
XENIUM_ENV = "HE2EXPR_XENIUM_PANCREAS"  # where the real crops are, if not beside the repository
XENIUM_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "xenium-pancreas"


@pytest.fixture(scope="module")
def panel_dir(tmp_path_factory) -> Path:
    """The demo dataset (two samples with expression, one without) on a 377-gene panel: the shared fixture's
    tissue (the small fixture's size and seed), so its masks are known to open."""
    from synthetic.demo import make_demo_dataset

    folder = tmp_path_factory.mktemp("panel377")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_demo_dataset(folder, n_nuclei=SMALL_FIXTURE_NUCLEI, seed=7, chunk_size=256, n_genes=N_PANEL)
    return folder


@pytest.fixture(scope="module")
def staged(panel_dir, tmp_path_factory) -> dict[str, Path]:
    """embed, fit, submit and validate through the `he2expr` command (the same mains as `make embed fit submit`)."""
    from submission.cli import main

    out = tmp_path_factory.mktemp("panel377-out")
    paths = {"cache": out / "features.zarr", "model": out / "model", "submission": out / "submission.csv"}
    data = ["--data", str(panel_dir)]
    assert main(["embed", *data, "--cache", str(paths["cache"]), "--encoder", "handcrafted", "--patch-sizes",
                 *PATCH_ARGS, "--device", "cpu", "--workers", "0"]) == 0
    assert main(["fit", *data, "--cache", str(paths["cache"]), "--model-dir", str(paths["model"]),
                 "--patch-sizes", *PATCH_ARGS, "--models", *MODELS]) == 0
    assert main(["submit", *data, "--cache", str(paths["cache"]), "--model-dir", str(paths["model"]),
                 "--out", str(paths["submission"])]) == 0
    assert main(["validate", str(paths["submission"]), *data, "--model-dir", str(paths["model"])]) == 0
    return paths


def _held_out(sample) -> np.ndarray:
    return sample.groups.index[sample.groups.isin(["validation", "test"])].to_numpy(np.int64)


def _assert_full_panel(frame: pd.DataFrame, cell_ids: np.ndarray, genes: list[str]) -> None:
    """Exactly the panel's genes, once each, for every held-out nucleus and no other."""
    assert set(frame["cell_id"]) == set(cell_ids.tolist())
    per_cell = frame.groupby("cell_id", observed=True)["gene"]
    assert (per_cell.size() == len(genes)).all() and (per_cell.nunique() == len(genes)).all()
    assert set(frame["gene"].astype(str)) == set(genes)


@pytest.mark.slow
def test_a_377_gene_panel_runs_embed_fit_submit_validate(panel_dir, staged):
    samples = open_samples(panel_dir)
    genes = next(s.genes for s in samples if s.has_expression)
    assert len(genes) == N_PANEL and genes[0] == "GENE000"

    summary = json.loads((staged["model"] / "predictor.json").read_text())  # the panel travels with the model
    assert summary["n_genes"] == N_PANEL and summary["genes"] == genes

    frame = pd.read_csv(staged["submission"])
    for sample in samples:  # demo0 has no expression: it takes the model's panel, the data's own
        _assert_full_panel(frame[frame["sample"] == sample.name], _held_out(sample), genes)


@pytest.mark.slow
def test_train_and_infer_on_a_377_gene_panel(panel_dir, staged, tmp_path):
    from submission.main import infer, train

    model_dir = tmp_path / "model"
    # The staged cache holds the same embeddings: train reuses them instead of embedding again.
    train(str(panel_dir), str(model_dir), models=MODELS, patch_sizes=FIXTURE_PATCH_SIZES, figures=False,
          cache_directory_path=str(staged["cache"]))
    genes = open_sample(panel_dir / "demo1.zarr").genes
    for name in ("demo0", "demo1"):
        frame = infer(str(panel_dir / f"{name}.zarr"), str(model_dir))
        _assert_full_panel(frame, _held_out(open_sample(panel_dir / f"{name}.zarr")), genes)


@pytest.mark.slow
def test_training_samples_with_different_panels_are_refused(panel_dir, staged, tmp_path, capsys):
    """A second sample on 300 genes beside demo1's 377: every stage refuses it, naming its file and where the panels
    first differ (position 300: no gene there, GENE300 in demo1)."""
    from regress.fit import fit_and_evaluate
    from regress.settings import FitSettings, default_features
    from dataclasses import replace
    from submission.cli import main
    from synthetic.demo import make_demo_sample

    data = tmp_path / "data"
    data.mkdir()
    (data / "demo1.zarr").symlink_to(panel_dir / "demo1.zarr")  # embedded in the staged cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = make_demo_sample(data / "other.zarr", seed=9, n_nuclei=60, n_genes=300, chunk_size=256)
    words = ("300 genes here, 377 there", "position 300", "'GENE300' in demo1.zarr")

    with pytest.raises(DataError) as opened:
        open_samples(data)
    assert str(other) in str(opened.value) and all(w in str(opened.value) for w in words), opened.value

    settings = FitSettings(features=replace(default_features(), patch_sizes=FIXTURE_PATCH_SIZES), models=MODELS)
    with pytest.raises(DataError) as fitted:
        fit_and_evaluate(data, staged["cache"], tmp_path / "model", settings, progress=False)
    assert str(other) in str(fitted.value) and all(w in str(fitted.value) for w in words), fitted.value

    assert main(["embed", "--data", str(data), "--cache", str(tmp_path / "c.zarr"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(other) in err
    assert not (tmp_path / "model").exists()


def test_an_explicit_panel_size_is_still_checked(panel_dir):
    with pytest.raises(DataError, match=rf"demo1.zarr.*anucleus.*expected 460 genes, found {N_PANEL}"):
        open_sample(panel_dir / "demo1.zarr", n_genes=460)


def xenium_pancreas() -> Path:
    return Path(os.environ.get(XENIUM_ENV) or XENIUM_DEFAULT)


@pytest.mark.skipif(not xenium_pancreas().is_dir(),
                    reason=f"the real Xenium pancreas crops are not at {xenium_pancreas()} (set {XENIUM_ENV})")
@pytest.mark.integration
def test_a_real_xenium_crop_opens_with_its_own_377_genes():
    """One real crop (10x Xenium, human pancreas): its panel is read as genes.txt lists it. Opening reads the
    tables only; nothing is embedded."""
    folder = xenium_pancreas()
    crop = sorted(folder.glob("*.zarr"))[0]
    listed = [line.strip() for line in (folder / "genes.txt").read_text().splitlines() if line.strip()]
    sample = open_sample(crop)
    assert sample.has_expression and len(sample.genes) == N_PANEL == len(listed)
    assert sample.genes == listed
    assert sample.microns_per_pixel == pytest.approx(0.2125)
