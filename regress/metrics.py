"""The challenge's metrics as pure, vectorised functions of (truth, prediction) matrices (nuclei x genes).

The per-nucleus and per-gene scores are here; they are aggregated into a model's scores in one place, the engine's
`regress.engine._summarise` (cell-wise Spearman by `official_score`: nuclei within each held-out region, then regions,
then samples).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from regress.components import principal_axes


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b; 0 where either row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    out = np.zeros(a.shape[0])
    ok = norm > 1e-12
    out[ok] = (a[ok] * b[ok]).sum(axis=1) / norm[ok]
    return out


def cellwise_spearman(y_true: np.ndarray, y_pred: np.ndarray, block: int = 20000) -> np.ndarray:
    """Per nucleus, Spearman correlation across genes (average ranks for ties); constant rows score 0."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: truth {y_true.shape}, prediction {y_pred.shape}")
    out = np.empty(y_true.shape[0])
    for start in range(0, y_true.shape[0], block):  # bounded memory for 10^6 nuclei
        rows = slice(start, start + block)
        out[rows] = _rowwise_pearson(rankdata(y_true[rows], axis=1), rankdata(y_pred[rows], axis=1))
    return out


def cellwise_mse(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per nucleus, the mean squared error over genes."""
    diff = np.asarray(y_true, dtype=np.float64) - np.asarray(y_pred, dtype=np.float64)
    return (diff * diff).mean(axis=1)


def genewise_pearson(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per gene, Pearson correlation across nuclei (HEST-Benchmark); 0 for genes constant in truth or prediction."""
    return _rowwise_pearson(np.asarray(y_true, dtype=np.float64).T, np.asarray(y_pred, dtype=np.float64).T)


def gene_moments(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(6, genes) sums over nuclei: n, sum t, sum p, sum t^2, sum p^2, sum t p. Added over blocks of nuclei, they give
    `genewise_pearson` of all of them (`pearson_from_moments`) without holding every prediction."""
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    return np.stack([np.full(t.shape[1], float(len(t))), t.sum(0), p.sum(0), (t * t).sum(0), (p * p).sum(0),
                     (t * p).sum(0)])


def pearson_from_moments(moments: np.ndarray) -> np.ndarray:
    """Per gene Pearson from summed `gene_moments`; 0 for genes constant in truth or prediction."""
    n, st, sp, stt, spp, stp = moments
    n = np.maximum(n, 1)
    var_t, var_p = stt - st * st / n, spp - sp * sp / n
    norm = np.sqrt(np.clip(var_t, 0, None) * np.clip(var_p, 0, None))
    out = np.zeros(len(norm))
    ok = norm > 1e-12 * np.maximum(n, 1)
    out[ok] = (stp - st * sp / n)[ok] / norm[ok]
    return out


def held_out_regions(coords: np.ndarray, samples: np.ndarray, radius: float) -> np.ndarray:
    """Label connected held-out regions: nuclei closer than `radius` (px) in the same sample share a region (the
    challenge's held-out tissue patches)."""
    labels = np.empty(len(coords), dtype=np.int64)
    offset = 0
    for sample in pd.unique(samples):
        idx = np.flatnonzero(samples == sample)
        graph = cKDTree(coords[idx]).sparse_distance_matrix(cKDTree(coords[idx]), radius, output_type="coo_matrix")
        _, comp = connected_components(graph, directed=False)
        labels[idx] = comp + offset
        offset += comp.max() + 1 if len(comp) else 0
    return labels


def official_score(per_nucleus: np.ndarray, samples: np.ndarray, regions: np.ndarray) -> float:
    """Mean over nuclei within each held-out region, then over regions within each sample, then over samples."""
    frame = pd.DataFrame({"score": per_nucleus, "sample": samples, "region": regions})
    by_region = frame.groupby(["sample", "region"], sort=False)["score"].mean()
    return float(by_region.groupby(level="sample", sort=False).mean().mean())


def default_region_radius(coords: np.ndarray) -> float:
    """Three times the median nearest-neighbour distance: neighbours in tissue link, separate regions do not."""
    if len(coords) < 2:
        return 1.0
    distances = cKDTree(coords).query(coords, k=2)[0][:, 1]
    return 3.0 * float(np.median(distances))


DISTANCE_BLOCK_VALUES = 50_000_000  # float32 distances per block of the oracle's queries (200 MB)


def expression_state_oracle(train_Y: np.ndarray, test_Y: np.ndarray, k: int = 30, n_components: int = 50,
                            block: int = 1000) -> np.ndarray:
    """A reference ceiling for image models: each test cell predicted as the mean measured expression of its `k`
    nearest training cells in the principal-component space of the training cells' measured expression.

    It knows each test cell's measured expression (where the cell lies among the states real cells take), so the
    gap from a model's score to the oracle's is headroom; what the oracle itself misses is the noise of single-cell
    counts that no prediction of a state can recover.
    """
    train_Y = np.asarray(train_Y, dtype=np.float64)
    centre = train_Y.mean(0)
    components = min(n_components, *train_Y.shape)
    basis = principal_axes(train_Y - centre, components, exact=True)
    points = ((train_Y - centre) @ basis).astype(np.float32)
    norms = (points * points).sum(1)
    k = min(k, len(train_Y))
    out = np.empty(np.shape(test_Y), dtype=np.float32)
    block = max(1, min(block, DISTANCE_BLOCK_VALUES // len(points)))  # distance rows held at once stay bounded
    for start in range(0, len(out), block):  # brute force in blocks: in 50 dimensions a KD-tree is slower
        query = ((np.asarray(test_Y[start: start + block], dtype=np.float64) - centre) @ basis).astype(np.float32)
        distances = norms[None, :] - 2.0 * query @ points.T  # + |query|^2, the same for every candidate
        idx = np.argpartition(distances, k - 1, axis=1)[:, :k]
        out[start: start + block] = train_Y[idx].mean(axis=1)
    return out


def headroom_share(score: float, floor: float, ceiling: float) -> float:
    """The share of the headroom from `floor` (the mean profile) to `ceiling` (the oracle) that `score` captures:
    0 at the floor, 1 at the ceiling, negative below the floor; NaN where there is no headroom."""
    gap = ceiling - floor
    return float((score - floor) / gap) if gap > 0 else float("nan")
