"""The one evaluation engine against independent references: scikit-learn's Ridge, scipy's spearmanr, numpy means,
and regions and splits known by construction."""

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from regress.engine import evaluate, select_and_fit
from regress.features import FeatureSpec
from regress.settings import FitSettings
from regress.source import ArraySource, SampleMatrix

N_GENES, N_FEATURES = 12, 6


def planted_sample(name: str, seed: int, n: int = 240, signal: float = 1.0, validation_patches: bool = False
                   ) -> SampleMatrix:
    """Nuclei on a 400 x 400 px square whose expression is linear in their features plus noise.

    With `validation_patches`, the nuclei inside two squares far apart are the 'validation' group: two held-out
    regions by construction.
    """
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 400, (n, 2))
    if validation_patches:  # 36 nuclei 10 px apart in each of two squares 200 px apart
        grid = np.stack(np.meshgrid(np.arange(6) * 10.0, np.arange(6) * 10.0), -1).reshape(-1, 2)
        coords[-72:] = np.r_[grid + 20, grid + 320]
    X = rng.normal(0, 1, (n, N_FEATURES))
    weights = np.random.default_rng(99).normal(0, 1, (N_FEATURES, N_GENES))
    Y = 2.0 + signal * X @ weights * 0.3 + rng.normal(0, 0.5, (n, N_GENES))
    group = np.full(n, "train", dtype=object)
    if validation_patches:
        group[-72:] = "validation"
    measured = np.ones(n, bool)
    measured[:5] = False  # unmeasured nuclei are neither trained on nor scored
    group[5:10] = "test"
    return SampleMatrix(name, np.arange(n) + 1, coords, group, measured, X.astype(np.float32),
                        np.clip(Y, 0, None).astype(np.float32))


def genes():
    return [f"g{i}" for i in range(N_GENES)]


def collect(into: list):
    return into.append


def reference_spearman(truth: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    return np.array([0.0 if np.ptp(p) == 0 else spearmanr(t, p).statistic for t, p in zip(truth, predictions)])


def test_leave_one_sample_out_ridge_equals_scikit_learn_and_scores_equal_scipy():
    matrices = [planted_sample(name, seed) for name, seed in (("c", 3), ("a", 1), ("b", 2))]
    source = ArraySource(matrices, genes())
    alpha = 30.0
    settings = FitSettings(features=FeatureSpec(), models=("ridge",), protocol="loso", ridge_alphas=(alpha,),
                           ridge_components=None)
    held = []
    evaluation = evaluate(source, settings, progress=False, sink=collect(held))
    assert evaluation.protocol == "loso"
    assert evaluation.test_samples == [["a"], ["b"], ["c"]]  # splits in the order of the samples' names
    by_sample = {m.name: m for m in matrices}
    split_scores, gene_pearson, all_spearman, all_mse = [], [], [], []
    for split, name in enumerate("abc"):
        part = next(h for h in held if h.split == split)
        assert part.sample == name
        rows = np.flatnonzero(by_sample[name].measured & (by_sample[name].group == "train"))
        np.testing.assert_array_equal(part.cell_id, by_sample[name].cell_id[rows])
        train = [m for m in matrices if m.name != name]
        X = np.concatenate([m.X[m.measured & (m.group == "train")] for m in train])
        Y = np.concatenate([m.Y[m.measured & (m.group == "train")] for m in train])
        sklearn = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, Y)
        expected = np.clip(sklearn.predict(by_sample[name].X[rows]), 0, Y.max(0))
        np.testing.assert_allclose(part.predictions, expected, rtol=1e-4, atol=1e-4)
        truth = by_sample[name].Y[rows]
        per_cell = reference_spearman(truth, expected)
        split_scores.append(per_cell.mean())  # one region per held-out sample
        gene_pearson.append([np.corrcoef(truth[:, g], expected[:, g])[0, 1] for g in range(N_GENES)])
        all_spearman.append(per_cell)
        all_mse.append(((truth - expected) ** 2).mean(1))
    scores = evaluation.scores.set_index("model").loc["ridge"]
    np.testing.assert_allclose(evaluation.split_scores["ridge"], split_scores, atol=1e-5)
    assert scores["spearman_official"] == pytest.approx(np.mean(split_scores), abs=1e-5)
    assert scores["spearman_mean"] == pytest.approx(np.concatenate(all_spearman).mean(), abs=1e-5)
    assert scores["mse"] == pytest.approx(np.concatenate(all_mse).mean(), rel=1e-4)
    # per gene within each held-out sample, then averaged over samples
    np.testing.assert_allclose(evaluation.gene_scores["ridge"], np.mean(gene_pearson, axis=0), atol=1e-5)
    assert scores["n_eval"] == sum(len(h.cell_id) for h in held)


def test_validation_scores_average_over_the_held_out_patches_and_the_mean_profile_is_the_training_mean():
    matrices = [planted_sample("s1", 1, n=600, validation_patches=True),
                planted_sample("s2", 2, n=600, validation_patches=True)]
    source = ArraySource(matrices, genes())
    held = []
    evaluation = evaluate(source, FitSettings(features=FeatureSpec(), models=("mean-profile", "ridge")),
                          progress=False, sink=collect(held))
    assert evaluation.protocol == "validation"  # 'auto' with a validation group
    train_Y = np.concatenate([m.Y[m.measured & (m.group == "train")] for m in matrices])
    for model in ("mean-profile", "ridge"):
        per_sample = []
        for matrix in matrices:
            part = next(h for h in held if h.model == model and h.sample == matrix.name)
            rows = np.flatnonzero(matrix.measured & (matrix.group == "validation"))
            np.testing.assert_array_equal(part.cell_id, matrix.cell_id[rows])
            if model == "mean-profile":
                np.testing.assert_allclose(part.predictions, np.tile(train_Y.mean(0), (len(rows), 1)), rtol=1e-5)
            patch_a = (matrix.coords[rows] < 100).all(1)  # the two patches, known by construction
            per_cell = reference_spearman(matrix.Y[rows], part.predictions)
            per_sample.append(np.mean([per_cell[patch_a].mean(), per_cell[~patch_a].mean()]))
        official = evaluation.scores.set_index("model").loc[model, "spearman_official"]
        assert official == pytest.approx(np.mean(per_sample), abs=1e-6)
    assert evaluation.split_scores == {}  # one split: no per-split scores


def test_spatial_kfold_holds_out_whole_blocks_once_each_and_trains_on_the_rest():
    matrix = planted_sample("only", 4, n=500)
    source = ArraySource([matrix], genes())
    held = []
    settings = FitSettings(features=FeatureSpec(), models=("mean-profile",), n_folds=4, n_blocks=4)
    evaluation = evaluate(source, settings, progress=False, sink=collect(held))
    assert evaluation.protocol == "spatial-kfold"  # 'auto' with one sample and no validation group
    trainable = set(matrix.cell_id[matrix.measured & (matrix.group == "train")])
    seen = [set(h.cell_id) for h in held]
    assert len(held) == 4 and set().union(*seen) == trainable and sum(map(len, seen)) == len(trainable)
    # each nucleus' square of the sample's extent cut 4 x 4
    cell = np.floor((matrix.coords - matrix.coords.min(0)) / (np.ptp(matrix.coords, 0) + 1e-6) * 4)
    block_of = dict(zip(matrix.cell_id.tolist(), map(tuple, cell.tolist())))
    blocks_held = [{block_of[c] for c in s} for s in seen]
    for i, blocks in enumerate(blocks_held):
        for j, others in enumerate(blocks_held):
            assert i == j or not blocks & others
    index = {c: i for i, c in enumerate(matrix.cell_id.tolist())}
    for h in held:  # the mean profile of the other folds' rows
        rest = sorted(trainable - set(h.cell_id))
        np.testing.assert_allclose(h.predictions[0], matrix.Y[[index[c] for c in rest]].mean(0), rtol=1e-5)
    frames = [pd.DataFrame({"score": reference_spearman(matrix.Y[[index[c] for c in h.cell_id]], h.predictions),
                            "block": [block_of[c] for c in h.cell_id]}) for h in held]
    means = pd.concat(frames).groupby("block")["score"].mean()  # one held-out region per block
    assert evaluation.scores["spearman_official"].iloc[0] == pytest.approx(np.mean(means), abs=1e-6)


def test_selection_saves_ridge_where_it_wins_refitted_on_every_measured_nucleus():
    matrices = [planted_sample(n, s, validation_patches=True) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    source = ArraySource(matrices, genes())
    settings = FitSettings(features=FeatureSpec(), models=("mean-profile", "ridge"), protocol="loso",
                           ridge_alphas=(5.0,), ridge_components=None)
    chosen = select_and_fit(source, settings, progress=False)
    assert chosen.best == "ridge" and "ridge" in chosen.verdict
    every = [m.measured & np.isin(m.group, ["train", "validation"]) for m in matrices]
    X, Y = np.concatenate([m.X[r] for m, r in zip(matrices, every)]), np.concatenate([m.Y[r] for m, r in zip(matrices, every)])
    expected = make_pipeline(StandardScaler(), Ridge(alpha=5.0)).fit(X, Y)
    np.testing.assert_allclose(chosen.estimator.predict(X[:50]), np.clip(expected.predict(X[:50]), 0, Y.max(0)),
                               rtol=1e-4, atol=1e-4)


def test_context_models_read_the_context_block_and_the_others_do_not():
    matrices = [planted_sample(n, s) for n, s in (("a", 1), ("b", 2))]
    # the second half of the columns plays the context block: base models must never see it
    wide = [replace(m, X=np.c_[m.X, np.random.default_rng(0).normal(0, 1, m.X.shape)].astype(np.float32))
            for m in matrices]
    source = ArraySource(wide, genes(), base_dim=N_FEATURES)
    settings = FitSettings(features=FeatureSpec(context_k=3), models=("ridge", "ridge+context"), protocol="loso",
                           ridge_alphas=(10.0,), ridge_components=None)
    chosen = select_and_fit(source, replace(settings, models=("ridge",)), progress=False)
    assert chosen.estimator.coef_.shape == (N_FEATURES, N_GENES)
    chosen = select_and_fit(source, replace(settings, models=("ridge+context",)), progress=False)
    assert chosen.estimator.coef_.shape == (2 * N_FEATURES, N_GENES)


@pytest.mark.parametrize("bad, message", [
    (dict(models=("ridge", "nonsense")), "unknown model"),
    (dict(protocol="random"), "unknown protocol"),
    (dict(tuning_folds="rows"), "unknown tuning_folds"),
    (dict(n_folds=0), "n_folds must be a positive"),
    (dict(features=FeatureSpec(context_k=0), models=("ridge+context",)), "needs a neighbourhood"),
])
def test_settings_are_checked_where_they_are_made(bad, message):
    with pytest.raises(ValueError, match=message):
        FitSettings(**bad)


def test_nothing_to_learn_from_is_refused():
    from slidedata.errors import DataError

    matrix = planted_sample("a", 1)
    with pytest.raises(DataError, match="no training nuclei"):
        ArraySource([replace(matrix, group=np.full(len(matrix), "test", dtype=object))], genes())


@pytest.fixture(scope="module")
def two_worker_cluster():
    """A dask cluster of two worker processes (an in-process cluster's event loop sometimes failed to start after
    other tests' clients), started once for the tests below: each start costs its workers' interpreters and
    imports, about 5 s of CPU apiece."""
    from tests.conftest import local_cluster

    with local_cluster(2) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_two_worker_dask_cluster_gives_the_in_process_results(demo_dir, embedded_cache, two_worker_cluster):
    import dask
    from distributed.client import _get_global_client

    from regress.source import CacheSource
    from regress.tasks import client_of
    from tests.conftest import FIXTURE_PATCH_SIZES

    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, block_components=8, context_k=15),
                           models=("ridge", "ridge+context"))
    here = select_and_fit(CacheSource.open(demo_dir, embedded_cache, settings.features, progress=False), settings,
                          progress=False)
    # The stage's client is not made dask's default scheduler: had it been, a client that then failed (or was
    # closed) stayed the scheduler of every later dask computation in the process ('no Client active').
    with client_of(two_worker_cluster.scheduler_address):
        assert dask.config.get("scheduler", None) != "dask.distributed"
        assert _get_global_client() is None
    remote = replace(settings, scheduler=two_worker_cluster.scheduler_address)
    there = select_and_fit(CacheSource.open(demo_dir, embedded_cache, remote.features, progress=False,
                                            scheduler=remote.scheduler), remote, progress=False)
    assert set(there.gathered.stats) == set(here.gathered.stats)
    np.testing.assert_array_equal(there.estimator.coef_, here.estimator.coef_)
    pd.testing.assert_frame_equal(there.evaluation.scores.drop(columns="fit_seconds"),
                                  here.evaluation.scores.drop(columns="fit_seconds"))


@pytest.mark.slow
def test_cluster_tasks_send_no_large_graph(two_worker_cluster):
    """Arguments are scattered once, not put into the graph of every task (dask warned 'Sending large graph')."""
    from regress.tasks import compute

    big = np.ones(2_000_000)  # 16 MB, shared by every call like a source with the axes of wide blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = compute(_weighed, [(big, i) for i in range(3)], two_worker_cluster.scheduler_address, "t",
                          progress=False)
    assert results == [2_000_000.0, 2_000_001.0, 2_000_002.0]
    assert not [w for w in caught if "large graph" in str(w.message)]


def _weighed(values: np.ndarray, offset: int) -> float:
    return float(values.sum()) + offset


def test_ridge_chooses_its_alpha_by_whole_held_out_samples_as_scikit_learn_would():
    """tuning_folds='samples' with three training samples: ridge's alpha minimises the summed squared error of
    leave-one-sample-out (scikit-learn's LeaveOneGroupOut and Ridge), then ridge is refitted on all of them."""
    from sklearn.model_selection import LeaveOneGroupOut

    matrices = [planted_sample(n, s, signal=0.4, validation_patches=True) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    # 40 columns of noise beside the signal: too little shrinkage fits the noise, too much loses the signal
    matrices = [replace(m, X=np.c_[m.X, np.random.default_rng(10 + i).normal(0, 1, (len(m), 40))].astype(np.float32))
                for i, m in enumerate(matrices)]
    alphas = (0.1, 30.0, 300.0, 3000.0, 30000.0)
    settings = FitSettings(features=FeatureSpec(), models=("ridge",), protocol="validation", ridge_alphas=alphas,
                           ridge_components=None, tuning_folds="samples")
    held = []
    evaluate(ArraySource(matrices, genes()), settings, progress=False, sink=collect(held))
    train = [m.measured & (m.group == "train") for m in matrices]
    X = np.concatenate([m.X[t] for m, t in zip(matrices, train)])
    Y = np.concatenate([m.Y[t] for m, t in zip(matrices, train)])
    groups = np.concatenate([np.full(t.sum(), i) for i, t in enumerate(train)])
    errors = [sum(((make_pipeline(StandardScaler(), Ridge(alpha=a)).fit(X[tr], Y[tr]).predict(X[te]) - Y[te]) ** 2)
                  .sum() for tr, te in LeaveOneGroupOut().split(X, Y, groups)) for a in alphas]
    best = alphas[int(np.argmin(errors))]
    assert best not in (alphas[0], alphas[-1])  # the data makes the choice matter
    reference = make_pipeline(StandardScaler(), Ridge(alpha=best)).fit(X, Y)
    for matrix in matrices:
        part = next(h for h in held if h.sample == matrix.name)
        rows = np.flatnonzero(matrix.measured & (matrix.group == "validation"))
        np.testing.assert_allclose(part.predictions, np.clip(reference.predict(matrix.X[rows]), 0, Y.max(0)),
                                   rtol=1e-4, atol=1e-4)


def test_the_spatial_baseline_trains_on_rows_as_scikit_learn_neighbours_would():
    from sklearn.neighbors import KNeighborsRegressor

    matrices = [planted_sample(n, s, n=600, validation_patches=True) for n, s in (("a", 1), ("b", 2))]
    held = []
    evaluate(ArraySource(matrices, genes()), FitSettings(features=FeatureSpec(), models=("spatial-knn",)),
             progress=False, sink=collect(held))
    for matrix in matrices:  # samples never meet: each is its own neighbourhood
        train = matrix.measured & (matrix.group == "train")
        knn = KNeighborsRegressor(n_neighbors=20).fit(matrix.coords[train], matrix.Y[train])
        rows = np.flatnonzero(matrix.measured & (matrix.group == "validation"))
        part = next(h for h in held if h.sample == matrix.name)
        train_max = np.concatenate([m.Y[m.measured & (m.group == "train")] for m in matrices]).max(0)
        np.testing.assert_allclose(part.predictions, np.clip(knn.predict(matrix.coords[rows]), 0, train_max),
                                   rtol=1e-5, atol=1e-5)


def test_models_that_train_on_rows_see_the_same_share_of_every_sample_role_and_block():
    from regress.engine import gather

    matrices = [planted_sample("a", 1, n=1200, validation_patches=True), planted_sample("b", 2, n=400)]
    settings = FitSettings(features=FeatureSpec(), models=("lightgbm",), sample_rows=400, protocol="loso")
    gathered = gather(ArraySource(matrices, genes()), settings, progress=False)
    measured = sum(int((m.measured & np.isin(m.group, ["train", "validation"])).sum()) for m in matrices)
    rows = gathered.rows
    assert abs(len(rows.Y) - 400) <= 20  # rounding per stratum
    share = pd.Series([key[:2] for key in rows.strata]).value_counts()
    for matrix, code in zip(matrices, (0, 1)):
        for role, group in ((0, "train"), (1, "validation")):
            n = int((matrix.measured & (matrix.group == group)).sum())
            assert share.get((code, role), 0) == pytest.approx(400 * n / measured, abs=12)
    # every row kept is a measured row of its sample, with its own expression
    for code, matrix in enumerate(matrices):
        mine = rows.codes == code
        lookup = {tuple(c): y for c, y in zip(matrix.coords.round(6).tolist(), matrix.Y)}
        for c, y in zip(rows.coords[mine].round(6).tolist(), rows.Y[mine]):
            np.testing.assert_array_equal(lookup[tuple(c)], y)


def test_ridge_chooses_its_alpha_by_the_held_out_cellwise_spearman_when_asked():
    """ridge_criterion='spearman': the alpha with the best summed cell-wise Spearman of leave-one-sample-out
    (scikit-learn's LeaveOneGroupOut and Ridge, predictions clipped at 0 as the challenge requires) is refitted."""
    from sklearn.model_selection import LeaveOneGroupOut

    from regress.metrics import cellwise_spearman

    matrices = [planted_sample(n, s, signal=0.4, validation_patches=True) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    matrices = [replace(m, X=np.c_[m.X, np.random.default_rng(10 + i).normal(0, 1, (len(m), 40))].astype(np.float32))
                for i, m in enumerate(matrices)]
    alphas = (0.1, 30.0, 300.0, 3000.0, 30000.0)
    settings = FitSettings(features=FeatureSpec(), models=("ridge",), protocol="validation", ridge_alphas=alphas,
                           ridge_components=None, tuning_folds="samples", ridge_criterion="spearman")
    held = []
    evaluate(ArraySource(matrices, genes()), settings, progress=False, sink=collect(held))
    train = [m.measured & (m.group == "train") for m in matrices]
    assert max(t.sum() for t in train) <= 3000  # every row of each fold is scored (ALPHA_SCORING_ROWS)
    X = np.concatenate([m.X[t] for m, t in zip(matrices, train)])
    Y = np.concatenate([m.Y[t] for m, t in zip(matrices, train)])
    groups = np.concatenate([np.full(t.sum(), i) for i, t in enumerate(train)])

    def fitted(alpha, rows):
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[rows], Y[rows])

    scores = [sum(cellwise_spearman(Y[te], np.clip(fitted(a, tr).predict(X[te]), 0, None)).sum()
                  for tr, te in LeaveOneGroupOut().split(X, Y, groups)) for a in alphas]
    best = alphas[int(np.argmax(scores))]
    assert best == 30.0  # the squared error picks 300 on the same data: the criterion decides
    reference = fitted(best, np.arange(len(X)))
    for matrix in matrices:
        part = next(h for h in held if h.sample == matrix.name)
        rows = np.flatnonzero(matrix.measured & (matrix.group == "validation"))
        np.testing.assert_allclose(part.predictions, np.clip(reference.predict(matrix.X[rows]), 0, Y.max(0)),
                                   rtol=1e-4, atol=1e-4)
