import numpy as np
import pytest
from sklearn.linear_model import Ridge

from regress.baselines import MeanProfile, SpatialKNNProfile
from regress.boosting import LightGBMRegressor
from regress.features import FeatureSpec, apply_weights, neighbour_set_block, neighbourhood_mean, radius_weights
from regress.ridge import RidgeCVRegressor
from regress.splits import row_folds


@pytest.fixture()
def linear_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12)).astype(np.float32) * rng.uniform(0.5, 3, 12)
    W = rng.normal(size=(12, 7))
    Y = np.abs(X @ W + rng.normal(scale=2.0, size=(600, 7)) + 5).astype(np.float32)
    return X, Y


def test_ridge_matches_sklearn_for_a_fixed_alpha(linear_data):
    X, Y = linear_data
    ours = RidgeCVRegressor(alphas=[3.0], n_folds=1, standardize=False).fit(X, Y)
    reference = Ridge(alpha=3.0).fit(X, Y)
    np.testing.assert_allclose(ours.coef_, reference.coef_.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, reference.intercept_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_ridge_cv_picks_the_alpha_that_explicit_refits_pick(linear_data, offset):
    X, Y = linear_data
    X = X + np.float32(offset)
    alphas = [0.01, 1.0, 100.0, 1e4]
    groups = np.arange(len(X)) % 10
    model = RidgeCVRegressor(alphas=alphas, n_folds=5, standardize=False).fit(X, Y, groups=groups)
    folds = row_folds(len(X), groups, 5, model.random_state)
    brute = []
    for alpha in alphas:
        sse = 0.0
        for k in range(5):
            X64 = X.astype(np.float64)  # a float32 reference would suffer the cancellation under test
            fit = Ridge(alpha=alpha).fit(X64[folds != k], Y[folds != k])
            sse += ((fit.predict(X64[folds == k]) - Y[folds == k]) ** 2).sum()
        brute.append(sse / Y.size)
    np.testing.assert_allclose(model.cv_mse_, brute, rtol=1e-4)
    assert model.alpha_ == alphas[int(np.argmin(brute))]


def test_ridge_standardised_predicts_well(linear_data):
    X, Y = linear_data
    mean_error = ((Y - Y.mean(0)) ** 2).mean()
    error = ((RidgeCVRegressor().fit(X, Y).predict(X) - Y) ** 2).mean()
    assert error < 0.5 * mean_error


def test_ridge_on_fewer_principal_components_than_features_predicts_through_them():
    """12 features that are 3 latent factors plus a little noise, expression linear in the factors: ridge on the top
    3 components predicts held-out rows well, and its coefficients, mapped back from 3 components, have rank 3
    (plain ridge's have rank 7). On the 3 weakest components (the noise) it would predict no better than the mean."""
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(800, 3))
    X = (latent @ rng.normal(size=(3, 12)) * rng.uniform(0.5, 3, 12) + rng.normal(scale=0.05, size=(800, 12)))
    Y = np.abs(latent @ rng.normal(size=(3, 7)) + rng.normal(scale=0.5, size=(800, 7)) + 5)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    model = RidgeCVRegressor(n_components=3).fit(X[:600], Y[:600])
    error = ((model.predict(X[600:]) - Y[600:]) ** 2).mean()
    assert error < 0.2 * ((Y[600:] - Y[:600].mean(0)) ** 2).mean()
    assert np.linalg.matrix_rank(model.coef_, tol=1e-6 * np.abs(model.coef_).max()) == 3
    assert np.linalg.matrix_rank(RidgeCVRegressor().fit(X[:600], Y[:600]).coef_) == 7


def test_predictions_are_clipped_to_training_range(linear_data):
    X, Y = linear_data
    model = RidgeCVRegressor().fit(X, Y)
    predictions = model.predict(X * 50)  # far outside the training range
    assert predictions.min() >= 0
    assert (predictions <= Y.max(0) + 1e-6).all()


def test_lightgbm_on_target_components_beats_the_mean(linear_data):
    X, Y = linear_data
    model = LightGBMRegressor(n_target_components=4, n_feature_components=None, n_estimators=200, n_jobs=1)
    model.fit(X[:450], Y[:450])
    error = ((model.predict(X[450:]) - Y[450:]) ** 2).mean()
    baseline = ((MeanProfile().fit(X[:450], Y[:450]).predict(X[450:]) - Y[450:]) ** 2).mean()
    assert error < 0.7 * baseline


def test_spatial_knn_keeps_samples_apart():
    from regress.families import ModelSpec

    layout = ModelSpec.parse("spatial-knn").layout(None, None, 0)
    coords, codes = np.array([[0, 0], [0, 1], [0, 0]], dtype=float), np.array([0, 0, 1])  # the third: sample 1
    Y = np.array([[1.0], [3.0], [100.0]])
    model = SpatialKNNProfile(k=2).fit(layout.take(None, coords, codes), Y)
    assert model.predict(layout.take(None, np.array([[0, 0.5]]), 0))[0, 0] == pytest.approx(2.0)


def test_neighbourhood_mean_matches_brute_force():
    rng = np.random.default_rng(2)
    coords, features = rng.random((40, 2)) * 100, rng.random((40, 3))
    result = neighbourhood_mean(coords, features, k=4)
    for i in (0, 17, 39):
        distances = np.linalg.norm(coords - coords[i], axis=1)
        distances[i] = np.inf
        np.testing.assert_allclose(result[i], features[np.argsort(distances)[:4]].mean(0))


def test_radius_mean_matches_brute_force():
    rng = np.random.default_rng(3)
    coords, features = rng.random((60, 2)) * 100, rng.random((60, 3)).astype(np.float32)
    result = apply_weights(radius_weights(coords, radius=15.0), features)
    for i in range(60):
        distances = np.linalg.norm(coords - coords[i], axis=1)
        near = (distances <= 15.0) & (np.arange(60) != i)
        expected = features[near].mean(0) if near.any() else np.zeros(3)
        np.testing.assert_allclose(result[i], expected, rtol=1e-5, atol=1e-6)


def brute_force_neighbour_set(coords, features, k, radius, unit):
    """The neighbour set, one nucleus at a time over all pairs: [features, dy, dx, distance, 1] of the k nearest
    others within the radius (inclusive), nearest first, zeros after."""
    n, d = features.shape
    out = np.zeros((n, k * (d + 4)))
    for i in range(n):
        distances = np.linalg.norm(coords - coords[i], axis=1)
        distances[i] = np.inf
        order = [j for j in np.argsort(distances, kind="stable") if distances[j] <= (radius or np.inf)][:k]
        for slot, j in enumerate(order):
            dy, dx = (coords[j] - coords[i]) * unit
            out[i, slot * (d + 4): (slot + 1) * (d + 4)] = [*features[j], dy, dx, distances[j] * unit, 1.0]
    return out


@pytest.mark.parametrize("radius", [12.0, None])
def test_neighbour_set_matches_brute_force(radius):
    rng = np.random.default_rng(4)
    coords, features = rng.random((70, 2)) * 100, rng.normal(size=(70, 3)).astype(np.float32)
    coords[4], coords[5] = [50.0, 50.0], [50.0, 62.0]  # exactly 12 apart: a neighbour at the radius counts
    expected = brute_force_neighbour_set(coords, features, 5, radius, unit=0.25)
    result = neighbour_set_block(coords, features, 5, radius, unit=0.25, rows=16)  # several row blocks
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    if radius is not None:
        counts = result[:, np.arange(5) * 7 + 6].sum(1)
        assert counts.min() < 5 and counts.max() == 5  # some nuclei have padded slots, some are full
        assert any(result[4, s * 7: s * 7 + 6].tolist() == [*features[5], 0.0, 3.0, 3.0] for s in range(5))


def test_a_neighbour_set_is_appended_and_leaves_the_other_blocks_as_they_were(embedded_cache):
    """The neighbour set follows the pooled context, which stays as it was; its block is the brute-force set of the
    base columns, offsets in microns (the fixture stores its pixel size); its columns are found by name."""
    from regress.features import feature_columns, sample_features, scale_sets
    from slidedata.feature_store import FeatureStore
    from tests.conftest import FIXTURE_PATCH_SIZES

    store = FeatureStore(embedded_cache)
    before = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, context_radius=(40.0,), context_pool=("mean", "max"))
    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, context_radius=(40.0,), context_pool=("mean", "max"),
                       neighbour_set=3, neighbour_radius="10um")
    old, new = sample_features(store, "demo1", before), sample_features(store, "demo1", spec)
    base = before.base_width(old.shape[1])
    assert new.shape[1] == old.shape[1] + 3 * (base + 4) == sum(w for _, w in spec.blocks(base))
    assert len(scale_sets(store, "demo1", spec, None)) == new.shape[1]
    assert spec.base_width(new.shape[1]) == base
    np.testing.assert_array_equal(new[:, : old.shape[1]], old)
    np.testing.assert_array_equal(new[:, feature_columns(before, spec, base)], old)
    microns = store.open_entry("demo1", "handcrafted", FIXTURE_PATCH_SIZES[0]).attrs["sample_microns_per_pixel"]
    coords = store.read_nuclei("demo1")[["y", "x"]].to_numpy(np.float64)
    expected = brute_force_neighbour_set(coords, old[:, :base].astype(np.float64), 3, round(10 / microns), microns)
    np.testing.assert_allclose(new[:, old.shape[1]:].astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    assert 0 < new[:, old.shape[1] + base + 3].mean() < 1  # some nuclei have a neighbour within 10 um, some not


def test_neighbour_set_options_are_checked_and_old_specs_load_without_one():
    import pickle

    with pytest.raises(ValueError, match="neighbour_set"):
        FeatureSpec(neighbour_set=-1)
    with pytest.raises(ValueError, match="patch size"):
        FeatureSpec(neighbour_set=4, neighbour_radius="-3um")
    spec = FeatureSpec(context_k=5, neighbour_set=4, neighbour_radius="30um")
    assert spec.as_dict()["neighbour_radius"] == "30um" and spec.without_context().neighbour_set == 0
    assert spec.without_neighbour_set() == FeatureSpec(context_k=5)
    assert [name for name, _ in spec.blocks(10)][-1] == ("neighbours", 4, "30um")
    old = object.__new__(FeatureSpec)  # a spec pickled (in a model of format 1) before the neighbour set existed
    state = dict(FeatureSpec().__dict__)
    del state["neighbour_set"], state["neighbour_radius"]
    object.__setattr__(old, "__dict__", state)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.neighbour_set == 0 and loaded == FeatureSpec() and loaded.blocks(10) == [(("base",), 10)]


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_ridge_matches_sklearn_on_features_far_from_zero(offset):
    """Features whose mean is 1000 times their spread (like RGB means and log-areas on real tissue): the sufficient
    statistics must not lose the spread to cancellation. Before the fix, R^2 against scikit-learn was -39 here."""
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(4000, 20)) + offset).astype(np.float32)
    Y = np.abs((X - offset) @ rng.normal(size=(20, 30)) * 0.3 + 2 + rng.normal(size=(4000, 30))).astype(np.float32)
    for standardize in (False, True):
        ours = RidgeCVRegressor(alphas=[10.0], n_folds=1, standardize=standardize).fit(X, Y)
        X64 = X.astype(np.float64)  # the reference in float64, or it suffers the same cancellation
        scale = X64.std(0) if standardize else np.ones(X.shape[1])
        reference = Ridge(alpha=10.0).fit(X64 / scale, Y.astype(np.float64))
        expected = reference.predict(X64 / scale)
        np.testing.assert_allclose(ours.coef_, reference.coef_.T / scale[:, None], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(ours.predict(X), np.clip(expected, 0, Y.max(0)), rtol=1e-4, atol=1e-4)


def test_ridge_on_principal_components_equals_scikit_learn_pca_then_ridge():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    X = (rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40)) + 50).astype(np.float32)
    Y = np.abs(X[:, :5] @ rng.normal(size=(5, 8)) * 0.05 + 3).astype(np.float32)
    ours = RidgeCVRegressor(alphas=[5.0], n_folds=1, n_components=6).fit(X, Y)
    X64 = X.astype(np.float64)
    Xs = (X64 - X64.mean(0)) / X64.std(0)
    Z = PCA(n_components=6).fit_transform(Xs)
    expected = np.clip(Ridge(alpha=5.0).fit(Z, Y.astype(np.float64)).predict(Z), 0, Y.max(0))
    np.testing.assert_allclose(ours.predict(X), expected, rtol=1e-3, atol=1e-3)


def test_a_scale_set_shares_one_scale_and_a_rotation_inside_it_changes_nothing():
    from regress.components import column_scale

    np.testing.assert_allclose(column_scale([1.0, 4.0, 9.0, 16.0], np.array([0, 1, 1, 2])),
                               [1.0, np.sqrt(6.5), np.sqrt(6.5), 4.0])
    # a group scaled as one keeps its geometry: ridge on a rotated copy of the group predicts the same
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 6)) * [1, 2, 3, 0.5, 1, 1]
    Y = np.abs(X[:, :3] @ rng.normal(size=(3, 4)) + 5)
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    rotated = np.c_[X[:, :2], X[:, 2:] @ rotation]
    groups = np.array([0, 1, 2, 2, 2, 2])
    a = RidgeCVRegressor(alphas=[30.0], n_folds=1, scale_sets=groups).fit(X, Y)
    b = RidgeCVRegressor(alphas=[30.0], n_folds=1, scale_sets=groups).fit(rotated, Y)
    np.testing.assert_allclose(a.predict(X), b.predict(rotated), rtol=1e-4, atol=1e-4)
    c = RidgeCVRegressor(alphas=[30.0], n_folds=1).fit(rotated, Y)  # column by column: not the same model
    assert np.abs(c.predict(rotated) - a.predict(X)).max() > 1e-3


def test_moment_statistics_combine_exactly_far_from_zero():
    from regress.ridge import MomentStats

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

    from regress.features import FeatureReducer, FeatureSpec
    from slidedata.feature_store import FeatureStore
    from tests.conftest import FIXTURE_PATCH_SIZES

    store = FeatureStore(embedded_cache)
    spec = FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=6)
    keys = FeatureReducer.wide_keys(store, "demo1", spec)
    assert len(keys) == 2  # both 27-wide handcrafted blocks
    parts = [FeatureReducer.subsample(store, name, keys, 300) for name in ("demo1", "demo2")]
    reducer = FeatureReducer.fit(parts, 6)
    key = f"handcrafted:{FIXTURE_PATCH_SIZES[0]}"
    rows = np.concatenate([p[key] for p in parts]).astype(np.float64)
    standardized = (rows - rows.mean(0)) / np.where(rows.std(0) > 1e-12, rows.std(0), 1)
    reference = PCA(6).fit(standardized).components_.T
    basis = reducer.axes[key][2]
    # the same subspace: every principal angle is zero
    np.testing.assert_allclose(np.linalg.svd(basis.T @ reference, compute_uv=False), 1.0, atol=1e-6)
    projected = reducer.transform(key, rows[:10])
    np.testing.assert_allclose(np.abs(projected), np.abs(standardized[:10] @ reference), rtol=1e-4, atol=1e-4)
