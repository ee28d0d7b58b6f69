"""Every registered model family honours one contract (as timm tests every registered model): the estimator API on
tiny data, scikit-learn's own check_estimator with only the exclusions a family declares, its parameters refused
where the settings are made, and the model-name grammar parsed in one place."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from regress.families import REGISTRY, InputLayout, ModelSpec, model_names
from regress.settings import FitSettings

MAX_LOG_EXPRESSION = float(np.log1p(100))
# Parameters that keep each family's fit to a fraction of a second here (a family absent uses its defaults)
TINY = {"lightgbm": {"n_estimators": 10, "n_target_components": 2, "n_feature_components": 3},
        "states": {"n_states": (3,), "C": (0.1,), "power": (1.0,), "n_feature_components": 3},
        "mlp-ensemble": {"n_members": 2, "hidden": (8,), "max_epochs": 2, "n_feature_components": 4},
        # built from no FeatureSpec, its layout has no neighbour slots (K = 0: rho on the row alone); the set itself
        # is tested in tests/test_neighbour_set.py
        "neighbour-set": {"n_members": 2, "phi_hidden": (4,), "phi_dim": 4, "rho_hidden": (8,), "max_epochs": 2,
                          "n_feature_components": 4}}
FAMILIES = sorted(REGISTRY)


def build(name: str):
    family = REGISTRY[name]
    return family.build(TINY.get(name, {}), InputLayout(family.reads, None, 5, 5))


def data(n: int = 90, genes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    Y = np.clip(1.5 + X[:, :genes] + rng.normal(0, 0.3, (n, genes)), 0, MAX_LOG_EXPRESSION).astype(np.float32)
    return X, Y, np.repeat(np.arange(3), n // 3)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_fits_predicts_and_clips(name):
    X, Y, groups = data()
    predictions = build(name).fit(X[:60], Y[:60], groups[:60]).predict(X[60:])
    assert predictions.shape == (30, Y.shape[1]) and predictions.dtype == np.float32
    assert (predictions >= 0).all() and (predictions <= Y[:60].max(0) + 1e-6).all()  # within [0, log1p(100)]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_one_dimensional_target_is_one_gene(name):
    X, Y, groups = data()
    one = build(name).fit(X, Y[:, 0], groups).predict(X)
    assert one.shape == (len(X),)


@pytest.mark.parametrize("name", FAMILIES)
def test_non_finite_input_is_refused_and_predict_needs_fit(name):
    X, Y, groups = data()
    with pytest.raises(NotFittedError):
        build(name).predict(X)
    bad_X, bad_Y = X.copy(), Y.copy()
    bad_X[3, 1], bad_Y[5, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match="NaN"):
        build(name).fit(bad_X, Y, groups)
    with pytest.raises(ValueError, match="infinity"):
        build(name).fit(X, bad_Y, groups)


@pytest.mark.parametrize("name", FAMILIES)
def test_clone_pickle_and_seed_give_the_same_model(name):
    X, Y, groups = data()
    first = build(name).fit(X, Y, groups)
    assert not hasattr(clone(first), "clip_max_") and clone(first).get_params().keys() == first.get_params().keys()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(first)).predict(X), first.predict(X))
    np.testing.assert_array_equal(clone(first).fit(X, Y, groups).predict(X), first.predict(X))


@pytest.mark.parametrize("name", [n for n in FAMILIES if REGISTRY[n].trains_from == "statistics"])
def test_statistics_trained_families_match_their_row_fit(name):
    """The streamed contract: the statistics of each group and its label give the model that rows give."""
    from regress.ridge import MomentStats

    X, Y, groups = data()
    labels = np.unique(groups)
    stats = [MomentStats.of(X[groups == g], Y[groups == g]) for g in labels]
    scored = []

    def scoring_rows(positions):
        scored.append(positions)
        rows = np.isin(groups, labels[positions])
        return X[rows], Y[rows]

    streamed = build(name).fit_statistics(stats, labels, scoring_rows)
    np.testing.assert_allclose(streamed.predict(X), build(name).fit(X, Y, groups).predict(X), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_scikit_learn_check_estimator_passes_but_the_declared_exclusions(name):
    from sklearn.utils.estimator_checks import check_estimator

    expected = REGISTRY[name].expected_failed_checks
    assert all(len(reason) > 20 for reason in expected.values())  # each exclusion says why
    results = check_estimator(build(name), expected_failed_checks=expected, on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert not failed, failed
    assert len(results) > 40


@pytest.mark.parametrize("bad, message", [
    (dict(ridge_alphas=()), "alphas.*at least one value"),
    (dict(ridge_alphas=(-1.0,)), "alphas.*range"),
    (dict(ridge_components=0), "n_components"),
    (dict(ridge_criterion="r2"), "criterion"),
    (dict(params={"lightgbm": {"n_estimators": -5}}), "lightgbm.*n_estimators"),
    (dict(params={"lightgbm": {"leaves": 8}}), "lightgbm: unknown parameter.*leaves"),
    (dict(params={"mlp-ensemble": {"n_members": 0}}), "mlp-ensemble.*n_members"),
    (dict(params={"mlp-ensemble": {"hidden": (32, 0)}}), "mlp-ensemble.*hidden"),
    (dict(params={"states": {"C": (0.1, 0.0)}}), "states.*'C'"),
    (dict(params={"spatial-knn": {"k": 0}}), "spatial-knn.*'k'"),
    (dict(params={"mean-profile": {"k": 3}}), "mean-profile: unknown parameter"),
    (dict(params={"forest": {}}), "unknown family 'forest'"),
    (dict(params={"deepsets": {"n_members": 2}}), "'deepsets' is now called 'mlp-ensemble'"),
    (dict(models=("deepsets",)), "'deepsets' is now called 'mlp-ensemble'"),
    (dict(models=("deepsets+context",)), r"'deepsets\+context' is now called 'mlp-ensemble'"),
    (dict(models=("mlp-ensemble+context",)), "always reads the neighbourhood"),
    (dict(models=("mean-profile+context",)), "never reads the neighbourhood"),
    (dict(models=("ridge+contexts",)), "unknown model"),
])
def test_bad_family_parameters_are_refused_when_the_settings_are_made(bad, message):
    with pytest.raises(ValueError, match=message):
        FitSettings(**bad)


def test_every_registered_family_is_checked_for_bad_parameters():
    for name, family in REGISTRY.items():
        first = next(iter(family.parameters), None)
        if first is None:
            continue
        with pytest.raises(ValueError, match=name):
            FitSettings(params={name: {first: object()}})


def test_the_cli_refuses_a_former_model_name_in_one_error_line(capsys):
    from regress.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--data", "x", "--models", "deepsets"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error") or "error:" in line]
    assert len(errors) == 1 and "is now called 'mlp-ensemble'" in errors[0]


def test_the_grammar_is_parsed_once_into_a_spec():
    assert ModelSpec.parse("ridge+context").name == "ridge+context" and ModelSpec.parse("ridge+context").context
    assert ModelSpec.parse("mlp-ensemble").context  # always reads the neighbourhood
    assert not ModelSpec.parse("mean-profile").context
    assert model_names()[:4] == ["mean-profile", "spatial-knn", "ridge", "ridge+context"]
    assert all(ModelSpec.parse(name).name == name for name in model_names())
    ordered = sorted(["mlp-ensemble", "lightgbm", "ridge+context", "states", "ridge", "mean-profile"],
                     key=lambda n: ModelSpec.parse(n).rank)
    assert ordered == ["mean-profile", "ridge", "ridge+context", "states", "lightgbm", "mlp-ensemble"]


def test_the_features_a_model_reads_follow_from_its_family():
    from regress.features import FeatureSpec, feature_columns

    spec = FeatureSpec(context_k=5, context_pool=("mean", "max"))
    settings = FitSettings(features=spec, models=("ridge", "mlp-ensemble"))
    assert settings.gathered_features == spec and settings.model_features("ridge") == spec.without_context()
    assert feature_columns(spec.without_context(), spec, 7) == slice(0, 7)
    layout = ModelSpec.parse("ridge+context").layout(spec, spec, 7, np.arange(21))
    assert layout.columns == slice(0, 21) and layout.width == 21 and len(layout.scale_sets) == 21
    only_max = FeatureSpec(context_k=5, context_pool=("max",))
    np.testing.assert_array_equal(feature_columns(only_max, spec, 2), [0, 1, 4, 5])  # base, then the max block
    # a neighbour set in the settings' spec is read by no family that does not ask for one in its own hook
    with_set = FitSettings(features=FeatureSpec(context_k=5, neighbour_set=3), models=("ridge", "ridge+context"))
    assert with_set.model_features("ridge+context") == FeatureSpec(context_k=5)
    assert with_set.model_features("ridge") == FeatureSpec()


NAME_FREE = ("engine.py", "selection.py", "fit.py", "tasks.py", "settings.py", "source.py", "predictor.py")


@pytest.mark.parametrize("module", NAME_FREE)
def test_no_module_but_the_registry_and_the_families_tests_a_model_name(module):
    """A comparison with a family's name (or the '+context' suffix) outside regress/families.py would make a
    second place that must learn of every new family."""
    names = set(REGISTRY) | {"+context", "deepsets"} | set(model_names())
    tree = ast.parse((Path(__file__).resolve().parents[1] / "regress" / module).read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("endswith", "startswith", "split"):
            operands = node.args
        else:
            continue
        for operand in operands:
            for leaf in ast.walk(operand):
                if isinstance(leaf, ast.Constant) and leaf.value in names:
                    offenders.append(f"line {node.lineno}: {leaf.value!r}")
    assert not offenders
