import numpy as np
import pytest

from regress.metrics import (
    cellwise_mse, cellwise_spearman, genewise_pearson, held_out_regions, official_score, score_table,
)


def test_spearman_hand_computed_with_ties():
    truth = np.array([[0.0, 0.0, 1.0, 2.0]])  # ranks 1.5 1.5 3 4
    pred = np.array([[0.1, 0.3, 0.2, 0.4]])  # ranks 1 3 2 4
    # Pearson of (1.5,1.5,3,4) and (1,3,2,4): centred (-1,-1,0.5,1.5) and (-1.5,0.5,-0.5,1.5)
    # covariance 1.5-0.5-0.25+2.25 = 3.0; norms sqrt(1+1+0.25+2.25)=sqrt(4.5), sqrt(5)
    assert cellwise_spearman(truth, pred)[0] == pytest.approx(3.0 / np.sqrt(4.5 * 5))


def test_spearman_constant_rows_score_zero_and_perfect_order_scores_one():
    truth = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    pred = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(cellwise_spearman(truth, pred), [1.0, 0.0, 0.0])


def test_spearman_is_rank_based_and_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    truth = rng.poisson(0.5, (50, 30)).astype(float)  # many ties
    pred = rng.random((50, 30))
    expected = [spearmanr(t, p).statistic for t, p in zip(truth, pred)]
    np.testing.assert_allclose(cellwise_spearman(truth, pred, block=7), expected, atol=1e-12)


def test_mse_and_genewise_pearson():
    truth = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 4.0]])
    pred = np.array([[0.0, 0.0], [2.0, 3.0], [5.0, 4.0]])
    np.testing.assert_allclose(cellwise_mse(truth, pred), [0.5, 0.0, 0.5])
    gene = genewise_pearson(truth, pred)
    assert gene[0] == pytest.approx(np.corrcoef([0, 2, 4], [0, 2, 5])[0, 1])
    assert gene[1] == pytest.approx(np.corrcoef([1, 3, 4], [0, 3, 4])[0, 1])
    assert genewise_pearson(truth, np.ones_like(truth)).tolist() == [0.0, 0.0]


def test_official_aggregation_is_unweighted_at_each_level():
    scores = np.array([1.0, 0.0, 0.0, 0.5, 0.7])
    samples = np.array(["A", "A", "A", "A", "B"])
    patches = np.array([0, 1, 1, 1, 2])
    # A: patch0 = 1.0, patch1 = mean(0, 0, 0.5) = 1/6 -> A = 7/12; B = 0.7; mean = (7/12 + 0.7) / 2
    assert official_score(scores, samples, patches) == pytest.approx((7 / 12 + 0.7) / 2)


def test_held_out_regions_are_connected_regions_per_sample():
    coords = np.array([[0, 0], [0, 5], [0, 10], [100, 100], [100, 104], [0, 0]], dtype=float)
    samples = np.array(["A", "A", "A", "A", "A", "B"])
    labels = held_out_regions(coords, samples, radius=6)
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4] != labels[0]
    assert labels[5] not in labels[:5]  # same position, other sample: another patch


def test_scoring_many_nuclei_is_vectorised():
    import time

    rng = np.random.default_rng(1)
    truth, pred = rng.random((20000, 460)), rng.random((20000, 460))
    start = time.perf_counter()
    table = score_table(truth, pred, np.array(["A"] * 20000), rng.random((20000, 2)) * 1000)
    assert set(table) == {"spearman_official", "spearman_mean", "mse", "gene_pearson"}
    assert time.perf_counter() - start < 60  # a per-row Python loop would take minutes


def test_official_score_uses_the_given_held_out_regions():
    """One region of 1 nucleus scoring -1 and one of 3 nuclei scoring +1 weigh equally: official 0, plain mean 0.5."""
    up = np.arange(10, dtype=float)
    truth = np.tile(up, (4, 1))
    pred = np.vstack([-up, up, up, up])
    coords = np.array([[0, 0], [0, 1], [0, 2], [0, 3]], dtype=float)  # all touching: one connected patch
    samples = np.array(["A"] * 4)
    connected = score_table(truth, pred, samples, coords)
    assert connected["spearman_official"] == pytest.approx(0.5)
    given = score_table(truth, pred, samples, coords, regions=np.array([7, 9, 9, 9]))
    assert given["spearman_official"] == pytest.approx(0.0)
    assert given["spearman_mean"] == pytest.approx(0.5)
