import numpy as np
import pytest

from regress.dataset import load_table
from regress.features import FeatureSpec, sample_features
from regress.fit import evaluation_splits, held_out_regions
from slidedata import open_samples
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


def test_evaluation_never_mixes_train_and_held_out_space(demo_dir, embedded_cache):
    table = load_table(open_samples(demo_dir), FeatureStore(embedded_cache), FeatureSpec(patch_sizes=(24,)))
    protocol, splits = evaluation_splits(table, "auto", 5, 4)
    assert protocol == "validation"
    train, test = splits[0]
    assert set(table.group[train]) == {"train"} and set(table.group[test]) == {"validation"}
    assert table.measured[train].all() and table.measured[test].all()

    _, folds = evaluation_splits(table, "spatial-kfold", 5, 4)
    blocks = table.spatial_blocks(4)
    assert len(folds) == 5
    for train, test in folds:
        assert not set(blocks[train]) & set(blocks[test])  # whole blocks are held out
        assert set(table.group[test]) == {"train"}
    assert sorted(np.concatenate([t for _, t in folds])) == sorted(np.flatnonzero(
        (table.group == "train") & table.measured))

    _, loso = evaluation_splits(table, "loso", 5, 4)
    assert [set(table.sample[t]) for _, t in loso] == [{"demo1"}, {"demo2"}]
    assert all(not set(table.sample[tr]) & set(table.sample[te]) for tr, te in loso)
    assert "demo0" not in set(table.sample[np.concatenate([t for _, t in loso])])  # no expression: never scored


def test_cross_validation_scores_the_held_out_blocks_and_samples_as_regions(demo_dir, embedded_cache):
    table = load_table(open_samples(demo_dir), FeatureStore(embedded_cache), FeatureSpec(patch_sizes=(24,)))
    np.testing.assert_array_equal(held_out_regions(table, "spatial-kfold", 4), table.spatial_blocks(4))
    # and evaluate scores with them: the official score is the mean over held-out blocks, not connected patches
    from regress.fit import FitSettings, cross_validated_predictions, evaluate
    from regress.metrics import cellwise_spearman, official_score, score_table

    settings = FitSettings(features=FeatureSpec(patch_sizes=(24,)), models=("ridge",), protocol="spatial-kfold")
    evaluation = evaluate(table, settings, table.X.shape[1], progress=False)
    _, splits = evaluation_splits(table, "spatial-kfold", 5, 4)
    predictions, _ = cross_validated_predictions("ridge", table, splits, settings, table.X.shape[1])
    held = evaluation.held
    per_nucleus = cellwise_spearman(table.Y[held], predictions)
    by_blocks = official_score(per_nucleus, table.sample[held], table.spatial_blocks(4)[held])
    connected = score_table(table.Y[held], predictions, table.sample[held], table.coords[held])["spearman_official"]
    assert evaluation.scores["spearman_official"].iloc[0] == pytest.approx(by_blocks)
    assert abs(by_blocks - connected) > 1e-6  # the two aggregations differ here, so the assertion above means it
    loso = held_out_regions(table, "loso", 4)
    for name in ("demo1", "demo2"):  # one region per held-out sample, never a one-nucleus region
        assert len(set(loso[table.sample == name])) == 1
    assert held_out_regions(table, "validation", 4) is None  # the challenge's own connected patches


def test_auto_protocol_is_leave_one_sample_out_without_a_validation_group(demo_dir, embedded_cache):
    table = load_table(open_samples(demo_dir), FeatureStore(embedded_cache), FeatureSpec(patch_sizes=(24,)))
    table.group[table.group == "validation"] = "train"
    protocol, splits = evaluation_splits(table, "auto", 5, 4)
    assert protocol == "loso" and len(splits) == 2


def test_per_sample_standardisation_is_a_z_score_within_each_sample(embedded_cache):
    store = FeatureStore(embedded_cache)
    raw = sample_features(store, "demo2", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES)).astype(np.float64)
    z = sample_features(store, "demo2", FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, standardize_per_sample=True))
    spread = raw.std(0)
    expected = np.where(spread > 1e-8, (raw - raw.mean(0)) / np.where(spread > 1e-8, spread, 1), 0.0)
    np.testing.assert_allclose(z.astype(np.float64), expected, rtol=1e-3, atol=2e-3)  # float16 output: ~5e-4 relative


def test_models_tune_across_samples_when_three_or_more_train_them():
    from regress.dataset import NucleusTable
    from regress.fit import FitSettings, tuning_groups

    n = 12
    table = NucleusTable(sample=np.repeat(np.array(["a", "b", "c"], dtype=object), 4), cell_id=np.arange(n),
                         group=np.full(n, "train", dtype=object), coords=np.random.default_rng(0).random((n, 2)),
                         X=np.zeros((n, 1)), Y=np.zeros((n, 1)), measured=np.ones(n, bool), genes=["g"])
    everything, two = np.arange(n), np.arange(8)
    np.testing.assert_array_equal(tuning_groups(table, everything, FitSettings()), np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(tuning_groups(table, two, FitSettings()), table.spatial_blocks(4)[two])
    np.testing.assert_array_equal(tuning_groups(table, two, FitSettings(tuning_groups="samples")),
                                  np.repeat([0, 1], 4))


def test_the_mean_profile_is_saved_when_no_model_beats_it():
    import pandas as pd

    from regress.fit import best_model

    scores = pd.DataFrame({"model": ["mean-profile", "spatial-knn", "ridge", "lightgbm"],
                           "spearman_official": [0.60, 0.70, 0.55, 0.58]})
    assert best_model(scores) == "mean-profile"  # spatial-knn cannot serve new tissue
    scores.loc[2, "spearman_official"] = 0.65
    assert best_model(scores) == "ridge"


def test_the_simplest_model_within_one_standard_error_of_the_best_is_saved():
    import pandas as pd

    from regress.fit import best_model

    scores = pd.DataFrame({"model": ["mean-profile", "ridge", "lightgbm"], "spearman_official": [0.50, 0.56, 0.57]})
    folds = {"mean-profile": np.array([0.20, 0.54, 0.52, 0.55]),  # behind the best on every fold: out
             "ridge": np.array([0.24, 0.59, 0.63, 0.64]),  # behind on average, ahead on two folds: within noise
             "lightgbm": np.array([0.25, 0.62, 0.58, 0.60])}
    assert best_model(scores, folds) == "ridge"
    folds["ridge"] = np.array([0.21, 0.56, 0.54, 0.57])  # behind on every fold, by more than the noise
    assert best_model(scores, folds) == "lightgbm"
    assert best_model(scores) == "lightgbm"  # one split: the best score


def test_gene_pearson_under_cross_validation_is_taken_within_each_split():
    from regress.fit import split_gene_pearson

    rng = np.random.default_rng(0)
    truth = rng.random((40, 3))
    predictions = truth.copy()
    predictions[20:] += 5.0  # the second split is offset as a whole: no effect within it
    splits = [(None, np.arange(20)), (None, np.arange(20, 40))]
    np.testing.assert_allclose(split_gene_pearson(truth, predictions, splits), 1.0)


def test_a_pixel_size_is_recorded_for_new_samples_only_where_the_training_samples_agree(embedded_cache):
    from regress.fit import _embed_settings

    store = FeatureStore(embedded_cache)
    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES)
    assert _embed_settings(store, ["demo1", "demo2"], spec)["microns_per_pixel"] == 0.2125
    entry = store.open_entry("demo2", "handcrafted", FIXTURE_PATCH_SIZES[0])
    stored = entry.group.attrs["sample_microns_per_pixel"]
    entry.group.attrs["sample_microns_per_pixel"] = 0.5
    try:
        assert _embed_settings(store, ["demo1", "demo2"], spec)["microns_per_pixel"] is None
    finally:
        entry.group.attrs["sample_microns_per_pixel"] = stored
