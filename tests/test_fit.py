import numpy as np
import pandas as pd
import pytest

from regress.features import FeatureSpec, sample_features
from regress.splits import (choose_protocol, evaluation_splits, needs_blocks, spatial_blocks, strata_table,
                            tunes_by_sample)
from slidedata.feature_store import FeatureStore
from tests.conftest import FIXTURE_PATCH_SIZES


def test_blocks_from_several_keys_concatenate(embedded_cache):
    store = FeatureStore(embedded_cache)
    together = sample_features(store, "demo1", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, morphology=False))
    split = sample_features(store, "demo1", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES[:1], morphology=False,
                                                        extra_keys=(("handcrafted", FIXTURE_PATCH_SIZES[1]),)))
    np.testing.assert_array_equal(together, split)
    with_context = sample_features(store, "demo1", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, context_k=5))
    assert with_context.shape[1] == 2 * (together.shape[1] + 4)  # + morphology, then the neighbours' mean


def test_the_cache_source_reads_what_the_sample_and_the_cache_hold(demo_dir, embedded_cache):
    from regress.source import CacheSource
    from slidedata import open_sample

    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES)
    source = CacheSource.open(demo_dir, embedded_cache, spec, progress=False)
    assert [s.name for s in source.samples] == ["demo1", "demo2"]  # demo0 has no expression, like DC1
    info = source.samples[1]
    matrix = source.matrix(info)
    sample = open_sample(demo_dir / "demo2.zarr")
    nuclei = FeatureStore(embedded_cache).read_nuclei("demo2")
    np.testing.assert_array_equal(matrix.cell_id, nuclei["cell_id"])
    table = sample.expression.to_df().set_index(sample.expression.obs["cell_id"].to_numpy())
    measured = np.isin(matrix.cell_id, table.index)
    np.testing.assert_array_equal(matrix.measured, measured)
    np.testing.assert_allclose(matrix.Y[measured], table.loc[matrix.cell_id[measured]].to_numpy(), rtol=1e-6)
    assert info.n_train == int((measured & (matrix.group == "train")).sum()) > 0
    assert info.n_validation == int((measured & (matrix.group == "validation")).sum()) > 0
    assert source.base_dim == matrix.X.shape[1] == 2 * 27 + 4  # two handcrafted blocks and morphology


def test_splits_are_unions_of_strata_and_never_mix_space():
    # strata (sample, role, block) of two samples: role 0 train, 1 validation; 4 blocks each
    keys = [(s, r, s * 16 + b) for s in (0, 1) for r in (0, 1) for b in range(4)]
    strata = strata_table(keys)
    (train, test), = evaluation_splits(strata, "validation", 5, ["a", "b"])
    assert set(strata["role"][train]) == {0} and set(strata["role"][test]) == {1}
    loso = evaluation_splits(strata, "loso", 5, ["b_second", "a_first"])  # split order follows the names
    assert [set(strata["sample"][t]) for _, t in loso] == [{1}, {0}]
    assert all(set(strata["role"][t]) == {0} and not set(strata["sample"][tr]) & set(strata["sample"][t])
               for tr, t in loso)
    folds = evaluation_splits(strata, "spatial-kfold", 3, ["a", "b"])
    assert len(folds) == 3
    held = np.concatenate([t for _, t in folds])
    assert sorted(held) == sorted(np.flatnonzero(strata["role"] == 0))  # every train block once
    for tr, t in folds:
        assert not set(strata["block"][tr]) & set(strata["block"][t]) and set(strata["role"][tr]) == {0}
    with pytest.raises(ValueError, match="leave-one-sample-out needs two"):
        evaluation_splits(strata_table([(0, 0, -1)]), "loso", 5, ["a"])
    with pytest.raises(ValueError, match="no validation nucleus"):
        evaluation_splits(strata_table([(0, 0, -1), (1, 0, -1)]), "validation", 5, ["a", "b"])


def test_spatial_blocks_cut_each_sample_into_squares_of_its_own():
    coords = np.array([[0, 0], [0, 99], [99, 0], [99, 99], [50, 50]], dtype=float)
    np.testing.assert_array_equal(spatial_blocks(coords, 0, 2), [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(spatial_blocks(coords, 1, 2), [4, 5, 6, 7, 7])  # never meets sample 0's


def test_protocol_and_tuning_folds_follow_the_number_of_samples():
    assert choose_protocol("auto", True, 3) == "validation"
    assert choose_protocol("auto", False, 2) == "loso"
    assert choose_protocol("auto", False, 1) == "spatial-kfold"
    assert choose_protocol("loso", True, 3) == "loso"
    assert tunes_by_sample(3, "auto") and not tunes_by_sample(2, "auto")
    assert tunes_by_sample(1, "samples") and not tunes_by_sample(5, "blocks")
    # leave one of three samples out: two train each split's model, so tuning folds are blocks
    assert needs_blocks("loso", 3, "auto") and not needs_blocks("loso", 4, "auto")
    assert needs_blocks("spatial-kfold", 5, "samples") and not needs_blocks("validation", 3, "auto")


def test_per_sample_standardisation_is_a_z_score_within_each_sample(embedded_cache):
    store = FeatureStore(embedded_cache)
    raw = sample_features(store, "demo2", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES)).astype(np.float64)
    z = sample_features(store, "demo2", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, standardize_per_sample=True))
    spread = raw.std(0)
    expected = np.where(spread > 1e-8, (raw - raw.mean(0)) / np.where(spread > 1e-8, spread, 1), 0.0)
    np.testing.assert_allclose(z.astype(np.float64), expected, rtol=1e-3, atol=2e-3)  # float16 output: ~5e-4 relative


def test_the_mean_profile_is_saved_when_no_model_beats_it():
    from regress.selection import best_model

    scores = pd.DataFrame({"model": ["mean-profile", "spatial-knn", "ridge", "lightgbm"],
                           "spearman_official": [0.60, 0.70, 0.55, 0.58]})
    assert best_model(scores)[0] == "mean-profile"  # spatial-knn cannot serve new tissue
    scores.loc[2, "spearman_official"] = 0.65
    assert best_model(scores)[0] == "ridge"


def test_the_simplest_model_within_one_standard_error_of_the_best_is_saved():
    from regress.selection import best_model

    scores = pd.DataFrame({"model": ["mean-profile", "ridge", "lightgbm"], "spearman_official": [0.50, 0.56, 0.57]})
    folds = {"mean-profile": np.array([0.20, 0.54, 0.52, 0.55]),  # behind the best on every fold: out
             "ridge": np.array([0.24, 0.59, 0.63, 0.64]),  # behind on average, ahead on two folds: within noise
             "lightgbm": np.array([0.25, 0.62, 0.58, 0.60])}
    best, verdict = best_model(scores, folds)
    assert best == "ridge" and "within one standard error of the best, lightgbm" in verdict
    folds["ridge"] = np.array([0.21, 0.56, 0.54, 0.57])  # behind on every fold, by more than the noise
    assert best_model(scores, folds)[0] == "lightgbm"
    assert best_model(scores)[0] == "lightgbm"  # one split: the best score


def test_a_pixel_size_is_recorded_for_new_samples_only_where_the_training_samples_agree(demo_dir, embedded_cache):
    from regress.fit import embed_settings
    from regress.source import CacheSource

    store = FeatureStore(embedded_cache)
    source = CacheSource.open(demo_dir, embedded_cache, FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES), progress=False)
    assert embed_settings(store, source)["microns_per_pixel"] == 0.2125
    entry = store.open_entry("demo2", "handcrafted", FIXTURE_PATCH_SIZES[0])
    stored = entry.group.attrs["sample_microns_per_pixel"]
    entry.group.attrs["sample_microns_per_pixel"] = 0.5
    try:
        assert embed_settings(store, source)["microns_per_pixel"] is None
    finally:
        entry.group.attrs["sample_microns_per_pixel"] = stored


def test_a_fit_warns_before_replacing_a_model_fitted_on_other_data(demo_dir, embedded_cache, tmp_path, caplog):
    import json
    import logging

    import joblib

    from regress.__main__ import main as fit_main
    from regress.model_dir import PREDICTOR, SUMMARY, ModelDir
    from regress.predictor import ExpressionPredictor

    model_dir = ModelDir(tmp_path / "model")
    genes = [f"G{i}" for i in range(460)]
    other = ExpressionPredictor("mean-profile", FeatureSpec(), None, genes, data="/data/her2st")
    model_dir.save_predictor(other)
    assert json.loads((model_dir.path / SUMMARY).read_text())["data"] == "/data/her2st"
    assert "fitted on /data/her2st (460 genes)" in model_dir.replaced_model("/data/her2st/other", genes)
    assert model_dir.replaced_model("/data/her2st", genes) is None
    assert "460 genes" in model_dir.replaced_model("/data/her2st", genes[:-1] + ["X"])  # same folder, new panel
    assert ModelDir(tmp_path / "empty").replaced_model("/data/her2st", genes) is None

    # A model saved before the data was recorded: its genes are read from the model itself.
    (model_dir.path / SUMMARY).write_text(json.dumps({"model": "mean-profile", "n_genes": 460}))
    joblib.dump(ExpressionPredictor("mean-profile", FeatureSpec(), None, genes[:-1] + ["X"]),
                model_dir.path / PREDICTOR)
    args = ["--data", str(demo_dir), "--cache", str(embedded_cache), "--model-dir", str(model_dir.path),
            "--patch-sizes", *map(str, FIXTURE_PATCH_SIZES), "--models", "mean-profile", "--no-figures"]
    with caplog.at_level(logging.WARNING, logger="regress.fit"):
        assert fit_main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "regress.fit"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "\n" not in warnings[0]
    assert f"this fit on {demo_dir.resolve()}" in warnings[0]
    assert json.loads((model_dir.path / SUMMARY).read_text())["data"] == str(demo_dir.resolve())

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regress.fit"):
        assert fit_main(args) == 0  # the same data again: nothing to warn about
    assert not [r for r in caplog.records if r.name == "regress.fit"]
