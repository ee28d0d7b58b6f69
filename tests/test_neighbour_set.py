"""The neighbour-set head (regress.neighbour_set) on planted sets: what it learns, what it must ignore (the order of
the neighbours, empty slots), that its numpy prediction is its torch network; and the family: the features it reads
(and no other family reads), its layout from the features, a fit through the stage."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from regress.metrics import cellwise_spearman
from regress.neighbour_set import NeighbourSetRegressor, set_forward

K, D, GENES = 4, 6, 30


def planted_sets(n: int = 2400, seed: int = 0, context: int = 0):
    """Cells whose expression depends only on their neighbours: state 1 where some present neighbour has feature 0
    above 0.5 (a niche), else state 0. Own features (and `context` more columns after them) are noise; each cell has 0
    to K neighbours, the rest of its K slots empty (zeros), in the layout of `regress.features.sample_features`.
    Four groups (samples) of equal size."""
    rng = np.random.default_rng(seed)
    own = rng.normal(size=(n, D + context))
    present = np.arange(K)[None, :] < rng.integers(0, K + 1, n)[:, None]
    features = rng.normal(size=(n, K, D))
    offsets = rng.normal(scale=10.0, size=(n, K, 2))
    slots = np.concatenate([features, offsets, np.hypot(*offsets.transpose(2, 0, 1))[..., None],
                            np.ones((n, K, 1))], 2) * present[..., None]
    niche = ((features[..., 0] > 0.5) & present).any(1).astype(int)
    profile = np.random.default_rng(99).gamma(0.5, 1.0, GENES)
    profiles = np.stack([profile, profile[::-1]])  # the two states rank the genes in opposite orders
    Y = np.log1p(rng.poisson(profiles[niche] * 3)).astype(np.float32)
    X = np.concatenate([own, slots.reshape(n, -1)], 1).astype(np.float32)
    return X, Y, np.repeat(np.arange(4), n // 4)


def small(**params) -> NeighbourSetRegressor:
    return NeighbourSetRegressor(**{"n_neighbours": K, "n_members": 2, "phi_hidden": (16,), "phi_dim": 16,
                                    "rho_hidden": (32,), "max_epochs": 3, "patience": 2, **params})


def test_a_signal_only_the_neighbours_carry_is_learned():
    from regress.mlp_ensemble import MLPEnsembleRegressor

    X, Y, groups = planted_sets()
    train, test = groups < 3, groups == 3
    model = small(max_epochs=8, patience=3, batch_size=32).fit(X[train], Y[train], groups[train])
    with_set = cellwise_spearman(Y[test], model.predict(X[test])).mean()
    own_only = MLPEnsembleRegressor(n_members=2, hidden=(32,), max_epochs=15, patience=3).fit(
        X[train][:, :D], Y[train], groups[train])
    without = cellwise_spearman(Y[test], own_only.predict(X[test][:, :D])).mean()
    mean = cellwise_spearman(Y[test], np.tile(Y[train].mean(0), (test.sum(), 1))).mean()
    # measured on i21b: 0.66 with the set, 0.40 from the own features alone, 0.41 for the mean profile (0.76
    # knowing the state); a head that ignored the neighbours, or a pool that missed them, stays near 0.41
    assert with_set > without + 0.15 and with_set > mean + 0.15


def test_neither_the_order_of_the_neighbours_nor_empty_slots_change_a_prediction():
    X, Y, groups = planted_sets(n=600, context=3)  # own features: base then 3 columns of pooled context
    model = small(neighbour_dim=D).fit(X, Y, groups)
    assert model.own_dim_ == D + 3 and model.context_inputs_ is not None
    own_dim, width = D + 3, D + 4
    slots = X[:, own_dim:].reshape(len(X), K, width)
    rng = np.random.default_rng(1)
    shuffled = np.take_along_axis(slots, np.argsort(rng.random((len(X), K)), 1)[..., None], 1)
    reference = model.predict(X)
    np.testing.assert_allclose(model.predict(np.c_[X[:, :own_dim], shuffled.reshape(len(X), -1)]), reference,
                               atol=1e-5)
    garbage = slots.copy()
    empty = garbage[:, :, -1] == 0
    garbage[empty] = rng.normal(size=(empty.sum(), width)) * 50  # whatever an empty slot holds
    garbage[empty, -1] = 0
    np.testing.assert_array_equal(model.predict(np.c_[X[:, :own_dim], garbage.reshape(len(X), -1)]), reference)
    # one more slot, empty, changes no member's output either; emptying the others does
    own, neighbours, present = model._inputs(X)
    phi, rho = model.members_[0]
    alone = set_forward(phi, rho, own, neighbours, present)
    padded = set_forward(phi, rho, own, np.concatenate([neighbours, np.ones((len(X), 1, neighbours.shape[2]))], 1),
                         np.c_[present, np.zeros(len(X))])
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    assert not np.allclose(set_forward(phi, rho, own, neighbours, present * 0), alone, atol=1e-3)


def test_numpy_prediction_is_the_torch_network_and_the_median_of_members():
    import torch

    X, Y, groups = planted_sets(n=600)
    model = small(n_members=3).fit(X, Y, groups)
    own, neighbours, present = model._inputs(X)
    present[:5] = 0  # some cells without any neighbour: both pools are 0
    members = []
    for phi_layers, rho_layers in model.members_:
        phi, rho = model._network(own.shape[1], neighbours.shape[2], GENES)
        for network, layers in ((phi, phi_layers), (rho, rho_layers)):
            linears = [m for m in network if isinstance(m, torch.nn.Linear)]
            assert len(linears) == len(layers)
            for linear, (weight, bias) in zip(linears, layers):
                linear.weight.data, linear.bias.data = torch.from_numpy(weight.T.copy()), torch.from_numpy(bias)
            network.eval()
        with torch.no_grad():
            out = model._torch_forward(phi, rho, *(torch.from_numpy(a) for a in (own, neighbours, present))).numpy()
        np.testing.assert_allclose(set_forward(phi_layers, rho_layers, own, neighbours, present), out, atol=1e-4)
        members.append(out * model.y_scale_ + model.y_mean_)
    present_x = X.copy()
    present_x[:5, 2 * D + 3::D + 4] = 0  # the same cells without neighbours, as the matrix says it
    np.testing.assert_allclose(model.predict(present_x), np.clip(np.median(members, 0), 0, Y.max(0)), atol=1e-4)


def test_predictions_are_clipped_and_a_refit_pickled_model_is_the_same_model():
    X, Y, groups = planted_sets(n=600)
    Y = np.minimum(Y * 3, np.log1p(100)).astype(np.float32)  # up to the challenge's ceiling
    model = small().fit(X, Y, groups)
    predicted = model.predict(np.r_[X, X * 40, -X * 40])  # far outside the training inputs
    assert predicted.min() == 0 and (predicted <= Y.max(0)).all() and (predicted.max(0) == Y.max(0)).any()
    assert predicted.dtype == np.float32
    np.testing.assert_array_equal(small().fit(X, Y, groups).predict(X), model.predict(X))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict(X), model.predict(X))
    assert not np.array_equal(small(random_state=5).fit(X, Y, groups).predict(X), model.predict(X))


def test_a_matrix_of_another_layout_is_refused_and_one_gene_is_a_vector():
    X, Y, groups = planted_sets(n=200)
    with pytest.raises(ValueError, match="columns are not"):
        small(n_neighbours=K + 1).fit(X, Y, groups)  # not [own | 5 x (d + 4)] for any d
    model = small(max_epochs=1).fit(X, Y[:, 0], groups)
    assert model.neighbour_dim_ == D and model.own_dim_ == D  # inferred: own features are the base features
    assert model.predict(X).shape == (200,)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :-1])


# --- the family ------------------------------------------------------------------------------------------------

def test_the_family_reads_its_set_and_no_other_family_does():
    from regress.families import REGISTRY, ModelSpec
    from regress.features import FeatureSpec
    from regress.settings import FitSettings

    models = ("ridge", "ridge+context", "mlp-ensemble", "neighbour-set")
    pixels = FitSettings(features=FeatureSpec(context_k=5, context_pool=("mean", "max")), models=models)
    gathered = pixels.gathered_features
    assert gathered.neighbour_set == 8 and gathered.neighbour_radius is None  # px sizes: the 8 nearest
    microns = FitSettings(features=FeatureSpec(patch_sizes=("12um", "24um"), context_radius=(70.0, 140.0)),
                          models=models).gathered_features
    assert microns.neighbour_set == 8 and microns.neighbour_radius.key == "30um"
    base, sets = 7, np.arange(7 * 3 + 8 * 11)  # base | 2 context blocks | 8 slots of 7 + 4
    layouts = {m: ModelSpec.parse(m).layout(gathered, pixels.features, base, sets) for m in models}
    assert layouts["ridge"].columns == slice(0, 7)
    assert layouts["ridge+context"].columns == slice(0, 21) == layouts["mlp-ensemble"].columns
    assert layouts["neighbour-set"].columns == slice(0, 109) and layouts["neighbour-set"].width == 109
    estimator = ModelSpec.parse("neighbour-set").make(pixels, layouts["neighbour-set"])
    assert (estimator.n_neighbours, estimator.neighbour_dim, len(estimator.scale_sets)) == (8, 7, 109)
    with pytest.raises(ValueError, match="neighbour-set: n_neighbours follow from its features"):
        FitSettings(params={"neighbour-set": {"n_neighbours": 4}})
    with pytest.raises(ValueError, match="needs a neighbourhood"):
        FitSettings(features=FeatureSpec(), models=("neighbour-set",))
    assert REGISTRY["neighbour-set"].context == "always"


def test_a_fit_through_the_stage_saves_a_predictor_that_rebuilds_its_set(demo_dir, embedded_cache, tmp_path):
    """The stage gathers the set, evaluates the head, saves it with its own spec, and the saved predictor builds
    the same columns again from the cache at prediction."""
    from regress.features import FeatureSpec, sample_features
    from regress.fit import fit_and_evaluate
    from regress.settings import FitSettings
    from slidedata.feature_store import FeatureStore
    from tests.conftest import FIXTURE_PATCH_SIZES

    tiny = {"n_members": 2, "phi_hidden": (8,), "phi_dim": 8, "rho_hidden": (16,), "max_epochs": 2,
            "n_feature_components": 4}
    settings = FitSettings(features=FeatureSpec(patch_sizes=FIXTURE_PATCH_SIZES, context_k=5),
                           models=("neighbour-set",), params={"neighbour-set": tiny}, figures=False)
    scores, predictor = fit_and_evaluate(demo_dir, embedded_cache, tmp_path / "model", settings, progress=False)
    assert list(scores["model"]) == ["neighbour-set"] and predictor.model_name == "neighbour-set"
    spec = predictor.feature_spec
    assert spec.neighbour_set == 8 and spec.neighbour_radius is None and spec.context_k == 5
    store = FeatureStore(embedded_cache)
    X = sample_features(store, "demo1", spec, reducer=predictor.reducer)
    base = spec.base_width(X.shape[1])
    assert predictor.estimator.n_features_in_ == X.shape[1] == 2 * base + 8 * (base + 4)
    assert predictor.estimator.neighbour_dim_ == base and predictor.estimator.own_dim_ == 2 * base
    _, predicted = predictor.predict_sample(store, "demo1")
    np.testing.assert_array_equal(predicted, predictor.estimator.predict(X))
    assert predicted.shape == (len(X), len(predictor.genes)) and np.isfinite(predicted).all()
