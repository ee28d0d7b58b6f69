"""Figures of the fit stage: the held-out scores, and maps of measured and predicted expression on tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regress.metrics import genewise_pearson
from regress.families import is_baseline

MAP_WINDOW_PX = 4096  # the square of tissue drawn in maps: wide enough for structure, one image read
MAP_IMAGE_EDGE = 512  # the H&E beside the maps, downsampled to at most this many pixels a side


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(scores: pd.DataFrame, gene_scores: dict[str, np.ndarray], best: str, path: Path, title: str,
                split_scores: dict[str, np.ndarray] | None = None) -> None:
    """Every model's held-out score on an axis zoomed to the scores (baselines grey, the saved model marked), each
    held-out split as a small dot beside its mean, and the per-gene Pearson of the saved model."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.45 * max(len(scores), 4)),
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    names = list(scores["model"])
    values = scores["spearman_official"].to_numpy(dtype=float)
    every = [values] + [np.asarray(v, float) for v in (split_scores or {}).values()]
    low, high = float(np.nanmin(np.concatenate(every))), float(np.nanmax(np.concatenate(every)))
    margin = max(0.1 * (high - low), 0.005)
    for y, (name, value) in enumerate(zip(names, values)):
        colour = "#999999" if is_baseline(name) else "#4c72b0"
        if split_scores and name in split_scores:
            left.plot(split_scores[name], np.full(len(split_scores[name]), y) + 0.18, ".", color=colour, alpha=0.6,
                      markersize=5)
        left.plot([value], [y], "D" if name == best else "o", color="#c44e52" if name == best else colour,
                  markersize=8)
        left.text(value, y - 0.22, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    left.set_yticks(range(len(names)), [f"{n}  (saved)" if n == best else n for n in names])
    left.set_ylim(len(names) - 0.5, -0.7)
    left.set_xlim(low - margin, high + margin)
    left.grid(axis="x", alpha=0.3)
    left.set_xlabel("cell-wise Spearman, official aggregation" + ("  (small dots: each held-out split)"
                                                                   if split_scores else ""))
    left.set_title(title)
    right.hist(gene_scores[best], bins=40, color="#4c72b0")
    right.set_xlabel(f"per-gene Pearson ({best})")
    right.set_ylabel("genes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def map_window(coords: np.ndarray, size: int = MAP_WINDOW_PX) -> np.ndarray:
    """Which nuclei fall in a `size` px square around the median nucleus (all of them on a small section)."""
    centre = np.median(coords, axis=0)
    return (np.abs(coords - centre) <= size / 2).all(axis=1)


def he_thumbnail(sample, coords: np.ndarray, max_edge: int = MAP_IMAGE_EDGE) -> tuple[np.ndarray, tuple] | None:
    """The H&E under `coords` (y, x), downsampled while read (memory of one chunk), and its extent for imshow;
    None where the window holds no pixel of the image (positions beyond it: the maps are drawn without it)."""
    y0, x0 = np.maximum(np.floor(coords.min(0)).astype(int), 0)
    y1, x1 = np.ceil(coords.max(0)).astype(int) + 1
    step = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / max_edge)))
    image = np.asarray(sample.image[:, y0:y1:step, x0:x1:step]).transpose(1, 2, 0)
    if not image.size:
        return None
    y1, x1 = min(y1, y0 + image.shape[0] * step), min(x1, x0 + image.shape[1] * step)
    return image, (x0, x1, y1, y0)


def informative_genes(truth: np.ndarray, predictions: np.ndarray, n: int = 3) -> list[int]:
    """The n best and n worst predicted genes (gene-wise Pearson) among the more variable half of the genes whose
    measurements have a colour scale at all (2nd and 98th percentiles apart): a gene measured in three nuclei of
    the window would show nothing."""
    low, high = np.percentile(truth, [2, 98], axis=0)
    spread = truth.std(axis=0)
    shown = np.flatnonzero((high > low) & (spread > 0))
    if len(shown) > 2 * n:
        shown = shown[spread[shown] >= np.median(spread[shown])]
    per_gene = genewise_pearson(truth, predictions)
    order = [int(g) for g in shown[np.argsort(per_gene[shown], kind="stable")]]
    best = order[::-1][:n]
    return best + [g for g in order[:n] if g not in best]


def most_variable_predicted(predictions: np.ndarray, n: int = 4) -> list[int]:
    """Without measurements: the n genes whose predictions vary most over the tissue."""
    return list(np.argsort(predictions.std(axis=0))[::-1][:n])


def plot_maps(coords: np.ndarray, predictions: np.ndarray, genes: list[str], chosen: list[int], path: Path,
              title: str, truth: np.ndarray | None = None, he: tuple[np.ndarray, tuple] | None = None) -> None:
    """Expression of the `chosen` genes on the tissue: measured (top row, when `truth` is given) and predicted, one
    colour scale per gene shared by both rows, with its colour bar; the H&E of the same window on the left."""
    plt = _pyplot()
    rows = 2 if truth is not None else 1
    columns = len(chosen) + (he is not None)
    fig, axes = plt.subplots(rows, columns, figsize=(2.9 * columns, 2.8 * rows + 0.6), squeeze=False)
    if he is not None:
        image, extent = he
        axes[0, 0].imshow(image, extent=extent)
        axes[0, 0].set_title("H&E", fontsize=9)
        for ax in axes[:, 0]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[1:, 0]:
            ax.axis("off")
    per_gene = genewise_pearson(truth, predictions) if truth is not None else None
    for column, gene in enumerate(chosen, start=he is not None):
        reference = truth[:, gene] if truth is not None else predictions[:, gene]
        low, high = np.percentile(reference, [2, 98])
        high = high if high > low else low + 1e-6
        layers = ([(truth, "measured")] if truth is not None else []) + [(predictions, "predicted")]
        for row, (values, label) in enumerate(layers):
            ax = axes[row, column]
            points = ax.scatter(coords[:, 1], coords[:, 0], c=values[:, gene], s=4, cmap="magma", vmin=low, vmax=high)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(genes[gene] + (f"\nr = {per_gene[gene]:.2f}" if per_gene is not None else ""),
                             fontsize=9)
            if column == (he is not None):
                ax.set_ylabel(label)
        fig.colorbar(points, ax=axes[:, column].tolist(), shrink=0.8, label="log1p expression")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
