import numpy as np
import pytest

from regress.metrics import cellwise_mse, cellwise_spearman, genewise_pearson, held_out_regions, official_score


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
    """The cell-wise Spearman of 1.67 M nuclei must not be a Python loop over rows. On few genes, where a loop's
    per-row overhead dominates, it is at least 10 times faster than scipy's spearmanr row by row (here about 100
    times; a per-row loop, even of numpy calls, about 1.5 times). Timed side by side, so the ratio holds on a loaded
    machine."""
    import time

    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    truth, pred = rng.random((1000, 20)), rng.random((1000, 20))
    results = []
    for score, repeats in ((lambda: cellwise_spearman(truth, pred), 5),
                           (lambda: np.array([spearmanr(t, p).statistic for t, p in zip(truth, pred)]), 1)):
        best = np.inf
        for _ in range(repeats):  # the best of five: a busy core only slows the fast one down
            start = time.perf_counter()
            values = score()
            best = min(best, time.perf_counter() - start)
        results.append((best, values))
    (vectorised, ours), (per_row, scipy_values) = results
    np.testing.assert_allclose(ours, scipy_values, atol=1e-12)
    assert per_row > 10 * vectorised, f"vectorised {vectorised:.3f} s, scipy row by row {per_row:.3f} s"
