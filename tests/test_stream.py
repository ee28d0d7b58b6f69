"""The streamed fit stage (regress.stream) against the in-memory reference (regress.fit.evaluate, RidgeCVRegressor)."""

from dataclasses import replace

import numpy as np
import pytest

from regress import stream
from regress.features import FeatureReducer, FeatureSpec
from regress.fit import FitSettings, evaluate, model_feature_spec, training_table, tuning_groups
from regress.models import MomentStats, RidgeCVRegressor
from slidedata import open_samples
from slidedata.feature_store import FeatureStore
from tests.conftest import FIXTURE_PATCH_SIZES

ALL_MODELS = ("mean-profile", "spatial-knn", "ridge", "ridge+context", "lightgbm", "lightgbm+context")


def _both(demo_dir, cache, settings):
    """(in-memory table, base width) and the streamed gathering of the same data."""
    samples = [s for s in open_samples(demo_dir) if s.has_expression]
    table, base_dim = training_table(samples, FeatureStore(cache), settings)
    fit, protocol = stream.gather(demo_dir, cache, model_feature_spec("+context", settings), settings.protocol,
                                  settings.tuning_groups, settings.n_blocks, settings.sample_rows, progress=False)
    return table, base_dim, fit, protocol


@pytest.mark.parametrize("protocol, models, block_components", [
    ("validation", ALL_MODELS, None),
    ("loso", ("mean-profile", "ridge", "ridge+context", "lightgbm"), None),
    ("spatial-kfold", ("ridge", "ridge+context"), 8),  # 27 handcrafted features per block -> 8 components
])
def test_streamed_evaluation_equals_the_in_memory_one(demo_dir, embedded_cache, protocol, models, block_components):
    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=block_components),
                           models=models, protocol=protocol)
    table, base_dim, fit, resolved = _both(demo_dir, embedded_cache, settings)
    assert resolved == protocol and fit.base_dim == base_dim
    reference = evaluate(table, settings, base_dim, progress=False)
    streamed = stream.evaluate_streamed(fit, embedded_cache, resolved, settings, progress=False)
    columns = ["spearman_official", "spearman_mean", "mse", "gene_pearson"]
    np.testing.assert_allclose(streamed.scores[columns].to_numpy(), reference.scores[columns].to_numpy(),
                               rtol=1e-5, atol=1e-7)
    assert streamed.scores["n_eval"].tolist() == reference.scores["n_eval"].tolist()
    for name in models:
        np.testing.assert_allclose(streamed.gene_scores[name], reference.gene_scores[name], atol=1e-5)
        if protocol != "validation":
            np.testing.assert_allclose(streamed.fold_scores[name], reference.fold_scores[name], atol=1e-6)


@pytest.mark.parametrize("name, block_components, ridge_components", [
    ("ridge", None, None), ("ridge+context", None, None),
    ("ridge+context", 8, 20),  # reduced blocks (scaled as groups) and ridge on 20 components of the 2 x 20 columns
])
def test_streamed_ridge_has_the_in_memory_coefficients(demo_dir, embedded_cache, name, block_components,
                                                       ridge_components):
    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=block_components),
                           ridge_components=ridge_components)
    table, base_dim, fit, _ = _both(demo_dir, embedded_cache, settings)
    streamed = stream.fit_model(name, fit, stream.labelled_units(fit), settings)
    labelled = np.flatnonzero(table.measured & np.isin(table.group, ("train", "validation")))
    X = table.X[labelled] if name.endswith("+context") else table.X[labelled, :base_dim]
    groups = None if block_components is None else np.r_[[0] * 8, [1] * 8, 2, 3, 4, 5]  # two blocks + morphology
    if name.endswith("+context") and groups is not None:
        groups = np.r_[groups, groups + 6]
    np.testing.assert_array_equal(fit.column_groups[: X.shape[1]] if groups is not None else 0, groups
                                  if groups is not None else 0)
    reference = RidgeCVRegressor(n_folds=settings.n_folds, n_components=ridge_components, column_groups=groups).fit(
        X, table.Y[labelled], groups=tuning_groups(table, labelled, settings))
    assert streamed.alpha_ == reference.alpha_
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(streamed.coef_, reference.coef_, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(streamed.intercept_, reference.intercept_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.cv_mse_, reference.cv_mse_, rtol=1e-6)


def test_a_two_worker_dask_cluster_gives_the_in_process_coefficients(demo_dir, embedded_cache):
    from distributed import LocalCluster

    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=8))
    spec = model_feature_spec("+context", settings)
    local, _ = stream.gather(demo_dir, embedded_cache, spec, "auto", "auto", 4, 10_000, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote, _ = stream.gather(demo_dir, embedded_cache, spec, "auto", "auto", 4, 10_000,
                                  scheduler=cluster.scheduler_address, progress=False)
        # the held-out predictions run there too
        scores = stream.evaluate_streamed(remote, embedded_cache, "validation", replace(settings, models=("ridge",)),
                                          scheduler=cluster.scheduler_address, progress=False).scores
    assert set(remote.stats) == set(local.stats)
    a = stream.fit_model("ridge+context", local, stream.labelled_units(local), settings)
    b = stream.fit_model("ridge+context", remote, stream.labelled_units(remote), settings)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)
    here = stream.evaluate_streamed(local, embedded_cache, "validation", replace(settings, models=("ridge",)),
                                    progress=False).scores
    assert scores["spearman_official"].iloc[0] == here["spearman_official"].iloc[0]


def test_moment_statistics_combine_exactly_far_from_zero():
    rng = np.random.default_rng(0)
    X = rng.normal(1000.0, 1.0, (3000, 5))  # far from zero relative to the spread: naive sums cancel
    Y = X[:, :2] * 0.5 + rng.normal(0, 0.1, (3000, 2))
    parts = [MomentStats.of(X[a:b], Y[a:b]) for a, b in ((0, 7), (7, 1500), (1500, 3000))]
    whole = MomentStats.combine(parts)
    centred = X - X.mean(0)
    np.testing.assert_allclose(whole.xx, centred.T @ centred, rtol=1e-9)
    np.testing.assert_allclose(whole.xy, centred.T @ (Y - Y.mean(0)), rtol=1e-9)
    assert whole.yy == pytest.approx(((Y - Y.mean(0)) ** 2).sum(), rel=1e-9)
    np.testing.assert_allclose(whole.mean_x, X.mean(0), rtol=1e-12)


def test_wide_blocks_are_reduced_to_their_principal_components(embedded_cache):
    from sklearn.decomposition import PCA

    store = FeatureStore(embedded_cache)
    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=6)
    keys = FeatureReducer.wide_keys(store, "demo1", spec)
    assert len(keys) == 2  # both 27-wide handcrafted blocks
    parts = [FeatureReducer.subsample(store, name, keys, 300) for name in ("demo1", "demo2")]
    reducer = FeatureReducer.fit(parts, 6)
    key = "handcrafted:24"
    rows = np.concatenate([p[key] for p in parts]).astype(np.float64)
    standardized = (rows - rows.mean(0)) / np.where(rows.std(0) > 1e-12, rows.std(0), 1)
    reference = PCA(6).fit(standardized).components_.T
    basis = reducer.axes[key][2]
    # the same subspace: every principal angle is zero
    np.testing.assert_allclose(np.linalg.svd(basis.T @ reference, compute_uv=False), 1.0, atol=1e-6)
    projected = reducer.transform(key, rows[:10])
    np.testing.assert_allclose(np.abs(projected), np.abs(standardized[:10] @ reference), rtol=1e-4, atol=1e-4)
