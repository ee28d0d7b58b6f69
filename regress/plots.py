"""Figures of the fit stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regress.settings import BASELINES


def plot_scores(scores: pd.DataFrame, gene_scores: dict[str, np.ndarray], best: str, path: Path, title: str) -> None:
    """Every model's held-out score (baselines grey, the saved model marked), and the per-gene Pearson of the saved
    model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = ["#999999" if m in BASELINES else "#4c72b0" for m in scores["model"]]
    left.barh(scores["model"], scores["spearman_official"], color=colours)
    for y, (name, value) in enumerate(zip(scores["model"], scores["spearman_official"])):
        left.text(value, y, f" {value:.3f}" + ("  (saved)" if name == best else ""), va="center", fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("cell-wise Spearman (official aggregation)")
    left.set_title(title)
    right.hist(gene_scores[best], bins=40, color="#4c72b0")
    right.set_xlabel(f"per-gene Pearson ({best})")
    right.set_ylabel("genes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
