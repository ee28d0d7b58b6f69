import gzip
import re

import numpy as np
import pandas as pd
import pytest

from regress.features import FeatureSpec
from regress.fit import fit_and_evaluate
from regress.settings import FitSettings
from regress.model_dir import ModelDir
from slidedata import open_samples
from submission.pipeline import make_submission
from submission.validate import main as validate_main, validate_submission
from submission.writer import COLUMNS, write_submission
from submission.predict import SamplePredictions, finalise
from tests.conftest import FIXTURE_PATCH_SIZES


@pytest.fixture(scope="session")
def fitted(demo_dir, embedded_cache, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, context_k=15),
                           models=("mean-profile", "spatial-knn", "ridge", "ridge+context"))
    scores, predictor = fit_and_evaluate(demo_dir, embedded_cache, model_dir, settings, progress=False)
    return model_dir, scores, predictor


@pytest.fixture(scope="session")
def submission_csv(demo_dir, embedded_cache, fitted, tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "submission.csv"
    report = make_submission(demo_dir, embedded_cache, fitted[0], out)
    assert report.problems == []
    return out


@pytest.fixture(scope="module")
def submission_frame(submission_csv):
    """The valid submission as read back (each broken file below is one change to it)."""
    return pd.read_csv(submission_csv)


def test_end_to_end_scores_beat_the_mean_profile(fitted):
    model_dir, scores, predictor = fitted
    table = scores.set_index("model")
    assert (scores["protocol"] == "validation").all()
    assert table.loc["ridge", "spearman_official"] > table.loc["mean-profile", "spearman_official"]
    assert table.loc["ridge", "mse"] < table.loc["mean-profile", "mse"] < 0.2
    assert predictor.model_name in ("ridge", "ridge+context")
    for name in ("predictor.joblib", "predictor.json", "scores.csv", "scores.png", "gene_pearson.csv"):
        assert (model_dir / name).exists()


def test_saved_model_reloads_and_predicts_identically(fitted, embedded_cache):
    from slidedata.feature_store import FeatureStore

    model_dir, _, predictor = fitted
    store = FeatureStore(embedded_cache)
    ids_a, values_a = predictor.predict_sample(store, "demo0")
    ids_b, values_b = ModelDir(model_dir).load_predictor().predict_sample(store, "demo0")
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(values_a, values_b)


def test_submission_covers_every_held_out_nucleus_and_gene(demo_dir, submission_frame):
    frame = submission_frame
    assert list(frame.columns) == COLUMNS
    for sample in open_samples(demo_dir):
        held_out = set(sample.groups.index[sample.groups.isin(["validation", "test"])])
        rows = frame[frame["sample"] == sample.name]
        assert set(rows["cell_id"]) == held_out  # DC1-like demo0 (no expression) is predicted too
        assert len(rows) == len(held_out) * 460
    assert frame["prediction"].min() >= 0 and frame["prediction"].notna().all()
    assert np.allclose(frame["prediction"] * 100, np.round(frame["prediction"] * 100))


def test_finalise_clips_rounds_and_removes_non_finite():
    values = np.array([[-0.3, 0.123456, np.nan, 9.0, np.inf]])
    np.testing.assert_array_equal(finalise(values, clip_max=np.array([3.0] * 5)), [[0.0, 0.12, 0.0, 3.0, 0.0]])


def test_finalise_never_exceeds_log1p_100_whatever_the_model_clips_at():
    """log1p(counts / total * 100) is at most log1p(100) = 4.6151: a model clipping higher (or not at all) still
    writes at most that, rounded as every prediction is (4.62)."""
    values = np.array([[9.99, 1e6, 4.6, 4.61]])
    for clip_max in (None, np.full(4, 50.0)):
        np.testing.assert_array_equal(finalise(values, clip_max), [[4.62, 4.62, 4.6, 4.61]])


# -- the validator flags each kind of broken file ---------------------------------------------------------------

def _broken(frame, how):
    frame = frame.copy()
    if how == "missing rows":
        return frame.iloc[1:]
    if how == "duplicated rows":
        return pd.concat([frame, frame.iloc[[5]]])
    if how == "rows for cell_ids that are not held out in this sample":
        extra = frame.iloc[:460].copy()
        extra["cell_id"] = 99_999_999
        return pd.concat([frame, extra])
    if how == "NaN predictions":
        frame.loc[frame.index[3], "prediction"] = np.nan
    if how == "negative predictions":
        frame.loc[frame.index[3], "prediction"] = -0.5
    if how == "infinite predictions":
        frame.loc[frame.index[3], "prediction"] = np.inf
    if how == "more than 2 decimals":
        frame.loc[frame.index[3], "prediction"] = 0.123
    if how == "unknown genes":
        frame.loc[frame.index[3], "gene"] = "NOT_A_GENE"
    if how == "rows of an unknown sample":
        frame.loc[frame.index[3], "sample"] = "XX9"
    if how == "wrong columns":
        return frame.rename(columns={"prediction": "value"})
    return frame


@pytest.mark.parametrize("how", [
    "missing rows", "duplicated rows", "rows for cell_ids that are not held out in this sample", "NaN predictions",
    "negative predictions", "infinite predictions", "more than 2 decimals", "unknown genes",
    "rows of an unknown sample", "wrong columns",
])
def test_validator_flags_each_problem(demo_dir, submission_frame, tmp_path, how, capsys):
    """Through the command line, whose report lists one problem per line: `  - <kind>: <count> (e.g. ...)`."""
    path = tmp_path / "broken.csv"
    _broken(submission_frame, how).to_csv(path, index=False,
                                          float_format="%.3f" if how == "more than 2 decimals" else None)
    assert validate_main([str(path), "--data", str(demo_dir)]) == 1
    report = capsys.readouterr().out
    kinds = set(re.findall(r"^  - (.+?): \d+", report, flags=re.MULTILINE))
    assert how in kinds, report
    if how in ("unknown genes", "rows of an unknown sample"):
        assert "missing rows" in kinds  # the damaged row no longer counts as the expected one


def test_valid_file_passes_and_parquet_round_trips(demo_dir, submission_csv, submission_frame, tmp_path):
    assert validate_main([str(submission_csv), "--data", str(demo_dir)]) == 0
    frame = submission_frame
    predictions = []
    for sample, rows in frame.groupby("sample", sort=False):
        genes = list(pd.unique(rows["gene"]))
        values = rows["prediction"].to_numpy().reshape(-1, len(genes))
        predictions.append(SamplePredictions(sample, rows["cell_id"].to_numpy()[:: len(genes)], genes, values))
    parquet = write_submission(predictions, tmp_path / "submission.parquet", nuclei_per_block=100)
    assert validate_submission(parquet, open_samples(demo_dir)) == []
    pd.testing.assert_frame_equal(pd.read_parquet(parquet).reset_index(drop=True), frame, check_dtype=False)


def _pandas_csv(sample: str, ids, genes: list[str], values: np.ndarray) -> str:
    """Reference: the long table written by pandas with `%.2f`, the writer's format before it built its own text."""
    return pd.DataFrame({"cell_id": np.repeat(np.asarray(ids), len(genes)), "gene": np.tile(genes, len(ids)),
                         "prediction": values.reshape(-1).astype(np.float64).round(2), "sample": sample}
                        ).to_csv(header=False, index=False, float_format="%.2f")


EDGE_VALUES = [0.0, 4.62, 0.005, 0.015, 0.125, 0.285, 2.675, 1e-9, 0.994999, 0.995, 9.999, 1.0, 0.1]


@pytest.mark.parametrize("case", ["integer ids", "text ids", "negative and NaN values", "negative zero",
                                  "a gene with a comma", "an id with a quote", "a missing text id", "no nuclei",
                                  "no genes", "a gene named twice"])
def test_csv_rows_are_byte_for_byte_what_pandas_writes(case, tmp_path):
    from submission.writer import csv_rows

    rng = np.random.default_rng(3)
    n, genes = (0 if case == "no nuclei" else 41), [f"G{i}" for i in range(0 if case == "no genes" else 23)]
    values = rng.gamma(0.5, 1.0, (n, len(genes))).astype(np.float32)
    if n and genes:
        values[0, : len(EDGE_VALUES)] = EDGE_VALUES
    ids, names = rng.choice(10 ** 9, n, replace=False) + 1, None
    if case == "negative and NaN values":
        values[1, :3] = [-0.5, np.nan, np.inf]
    if case == "negative zero":
        values[1, :2] = [-0.0, -0.001]  # both '-0.00' in pandas' text
    if case == "a gene with a comma":
        genes[4] = "HLA-A,B"
    if case in ("text ids", "an id with a quote", "a missing text id"):
        names = np.array([f"aaab{i:04d}-1" for i in range(n)], dtype=object)
        if case == "an id with a quote":
            names[2] = 'cell "2"'
        if case == "a missing text id":
            names[3] = None  # pandas writes an empty field
    if case == "a gene named twice":
        genes[5] = genes[4]
    predictions = SamplePredictions("UC1_I", ids, genes, values, names)
    written = names if names is not None else ids
    if case == "a gene named twice":  # refused, as pandas' categories refuse it
        with pytest.raises(ValueError, match="unique"):
            csv_rows(predictions, written, values)
        return
    assert csv_rows(predictions, written, values).decode() == _pandas_csv("UC1_I", written, genes, values)
    if case in ("integer ids", "text ids"):  # the whole file, plain and gzip, header included
        for name in ("s.csv", "s.csv.gz"):
            path = write_submission([predictions, predictions], tmp_path / name, nuclei_per_block=10)
            text = gzip.decompress(path.read_bytes()).decode() if name.endswith(".gz") else path.read_text()
            assert text == "cell_id,gene,prediction,sample\n" + 2 * _pandas_csv("UC1_I", written, genes, values)


def test_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("previous\n")

    def exploding():
        yield SamplePredictions("A", np.array([1, 2]), ["g1", "g2"], np.ones((2, 2)))
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_submission(exploding(), path)
    assert path.read_text() == "previous\n"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_anndata_output_and_spatialdata_table(demo_dir, embedded_cache, fitted, tmp_path):
    import shutil

    import anndata as ad
    import spatialdata as sd

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    report = make_submission(data, embedded_cache, fitted[0], tmp_path / "s.csv", anndata_dir=tmp_path / "h5ad",
                             into_spatialdata=True)
    table = ad.read_h5ad(tmp_path / "h5ad" / "demo1.h5ad")
    assert table.n_obs == report.per_sample["demo1"] and table.n_vars == 460
    stored = sd.read_zarr(data / "demo1.zarr").tables["predicted_expression"]
    np.testing.assert_allclose(stored.X, table.X)


# -- the model's panel, the sample's panel, and samples with nothing held out -----------------------------------

def _rewrite_sample(source, folder, genes=None, all_train=False):
    """`source` rewritten under `folder` (same image, mask and pixel size) with its genes renamed to `genes` and/or
    every nucleus in group train."""
    import anndata as ad

    from slidedata import open_sample
    from slidedata.writer import write_sample

    sample = open_sample(source)
    groups = pd.DataFrame({"cell_id": sample.groups.index.to_numpy(np.int64),
                           "group": "train" if all_train else sample.groups.to_numpy()})
    expression = None
    if sample.has_expression:
        names = list(genes or sample.genes)
        expression = ad.AnnData(X=np.asarray(sample.expression.X), var=pd.DataFrame(index=names),
                                obs=pd.DataFrame({"cell_id": sample.expression.obs["cell_id"].to_numpy(np.int64)},
                                                 index=sample.expression.obs_names))
    return write_sample(folder / f"{sample.name}.zarr", np.asarray(sample.image), np.asarray(sample.mask), groups,
                        expression, chunk_size=256, microns_per_pixel=sample.microns_per_pixel)


@pytest.fixture(scope="module")
def other_panel(demo_dir, fitted, tmp_path_factory):
    """demo1 measured on another panel: 403 of the model's 460 genes, and 57 it does not know."""
    genes = list(fitted[2].genes)
    renamed = genes[:403] + [f"OTHER{i}" for i in range(57)]
    return _rewrite_sample(demo_dir / "demo1.zarr", tmp_path_factory.mktemp("other-panel"), renamed)


def test_the_model_refuses_a_sample_measured_on_another_panel(other_panel, embedded_cache, fitted, tmp_path,
                                                              capsys):
    from slidedata.errors import DataError
    from submission.__main__ import main as submission_main
    from submission.main import infer

    model_dir, _, predictor = fitted
    missing = predictor.genes[403]
    with pytest.raises(DataError, match=rf"demo1.*57 of the model's genes missing.*'{missing}'.*57 genes here.*"
                                        r"'OTHER0'"):
        make_submission(other_panel.parent, embedded_cache, model_dir, tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"sample demo1's gene panel differs.*'OTHER0'"):
        infer(str(other_panel), str(model_dir))
    assert not (tmp_path / "s.csv").exists()

    rc = submission_main(["--data", str(other_panel.parent), "--cache", str(embedded_cache), "--model-dir",
                          str(model_dir), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "demo1" in err


def test_one_gene_rule_for_writer_and_validator(demo_dir, other_panel, submission_frame, fitted, tmp_path):
    """The file is checked against the sample's own panel where it has one, the model's otherwise: rows of the
    model's genes for a sample measured on another panel are invalid, even when the model's genes are passed."""
    from submission.validate import expected_genes

    model_genes = list(fitted[2].genes)
    samples = open_samples(other_panel.parent)
    assert expected_genes(samples, model_genes)["demo1"][-1] == "OTHER56"
    frame = submission_frame
    frame[frame["sample"] == "demo1"].to_csv(tmp_path / "demo1.csv", index=False)
    kinds = {p.kind for p in validate_submission(tmp_path / "demo1.csv", samples, model_genes)}
    assert {"unknown genes", "missing rows"} <= kinds

    # demo0 has no expression (like DC1): the model's panel is its panel.
    demo0 = [s for s in open_samples(demo_dir) if s.name == "demo0"]
    assert expected_genes(demo0, model_genes)["demo0"] == model_genes
    frame[frame["sample"] == "demo0"].to_csv(tmp_path / "demo0.csv", index=False)
    assert validate_submission(tmp_path / "demo0.csv", demo0, model_genes) == []
    reversed_genes = model_genes[::-1]  # the rows name their genes: the order of a panel does not matter
    assert validate_submission(tmp_path / "demo0.csv", demo0, reversed_genes) == []


@pytest.fixture(scope="module")
def nothing_held_out(demo_dir, tmp_path_factory):
    """demo1 with every nucleus in train: what the spot importer writes unless told to hold tissue out."""
    return _rewrite_sample(demo_dir / "demo1.zarr", tmp_path_factory.mktemp("all-train"), all_train=True)


def test_no_held_out_nuclei_is_an_empty_valid_submission(nothing_held_out, embedded_cache, fitted, tmp_path, capsys):
    from submission.__main__ import main as submission_main
    from submission.main import infer

    model_dir, _, predictor = fitted
    frame = infer(str(nothing_held_out), str(model_dir))
    assert frame.empty and list(frame.columns) == ["cell_id", "gene", "prediction"]
    assert frame["cell_id"].dtype == np.int64 and frame["prediction"].dtype == np.float64
    assert list(frame["gene"].cat.categories) == list(predictor.genes)

    out = tmp_path / "submission.csv"
    rc = submission_main(["--data", str(nothing_held_out.parent), "--cache", str(embedded_cache), "--model-dir",
                          str(model_dir), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0 and "validation: ok" in printed.out
    notices = [line for line in printed.err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and "no sample has held-out nuclei" in notices[0]
    assert out.read_text() == ",".join(COLUMNS) + "\n"
    assert validate_main([str(out), "--data", str(nothing_held_out.parent)]) == 0
    assert "valid (and empty: no nucleus of the data is held out" in capsys.readouterr().out
    assert validate_main(["--submission", str(out), "--data", str(nothing_held_out.parent)]) == 0  # as score takes it
    with pytest.raises(SystemExit):
        validate_main([str(out), "--submission", str(out), "--data", str(nothing_held_out.parent)])

    report = make_submission(nothing_held_out.parent, embedded_cache, model_dir, tmp_path / "submission.parquet")
    assert report.problems == [] and report.rows == 0
    table = pd.read_parquet(tmp_path / "submission.parquet")
    assert list(table.columns) == COLUMNS and len(table) == 0 and table["prediction"].dtype == np.float64


def test_the_fit_and_the_submission_draw_maps(demo_dir, embedded_cache, fitted, tmp_path):
    from matplotlib.image import imread

    from submission.pipeline import make_submission

    model_dir = fitted[0]
    drawn = imread(model_dir / "maps.png")  # measured vs predicted on held-out tissue, H&E beside
    assert drawn.shape[0] > 200 and drawn.shape[1] > 600
    report = make_submission(demo_dir, embedded_cache, model_dir, tmp_path / "s.csv", maps_dir=tmp_path / "maps")
    assert report.problems == []
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["demo0.png", "demo1.png", "demo2.png"]
    assert imread(tmp_path / "maps" / "demo0.png").shape[1] > 600  # DC1-like: predictions only, still drawn


def test_maps_show_the_best_and_worst_predicted_genes_never_a_constant_one():
    from regress.plots import informative_genes, most_variable_predicted

    rng = np.random.default_rng(0)
    truth = rng.random((50, 6))
    truth[:, 3] = 1.0  # constant: no correlation to show
    truth[:, 5] = 0.0
    truth[:2, 5] = 1.0  # measured in 2 nuclei of 50: no colour scale (its 98th percentile is 0)
    predictions = np.c_[truth[:, 0], rng.random(50), -truth[:, 2], rng.random(50), truth[:, 4] + rng.random(50),
                        -truth[:, 5]]
    chosen = informative_genes(truth, predictions, n=1)
    assert chosen == [0, 2]  # r = 1 and r = -1 (gene 5's r = -1 is not shown: nothing to see)
    assert not {3, 5} & set(informative_genes(truth, predictions, n=2))
    assert most_variable_predicted(np.c_[np.zeros(10), np.arange(10), np.arange(10) * 3], 2) == [2, 1]
