"""Which evaluated model the fit stage saves, and why (in words the CLI prints)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from regress.families import ModelSpec


def best_model(scores: pd.DataFrame, split_scores: dict[str, np.ndarray] | None = None) -> tuple[str, str]:
    """(the model to save, the rule's verdict), among the models and the mean profile.

    With one held-out split: the best official Spearman. With several (folds, samples): the simplest model whose
    mean shortfall from the best, split by split, is within one standard error of that shortfall (the one-standard-
    error rule, paired): on four real sections the best of the inner folds was LightGBM every time, and on the
    section left out it lost to ridge+context every time. The mean profile stays a candidate on purpose: where
    nothing beats it on held-out tissue, it is the honest choice. A family that cannot serve tissue it never saw
    (the spatial baseline: positions alone) is no candidate. Simplest first: each family's rank in the registry.
    """
    specs = {name: ModelSpec.parse(name) for name in scores["model"]}
    candidates = scores[[specs[m].family.serves_unseen_tissue for m in scores["model"]]]
    if not len(candidates):
        raise ValueError("no model to choose from: add a model or the mean-profile baseline")
    ranked = candidates.sort_values("spearman_official", ascending=False, kind="stable")
    best, top = str(ranked["model"].iloc[0]), float(ranked["spearman_official"].iloc[0])
    if not split_scores or len(split_scores.get(best, ())) < 2:
        return best, f"{best} has the best held-out score ({top:.4f})"
    names = list(candidates["model"])
    ordered = sorted(names, key=lambda m: specs[m].rank)
    for name in ordered:
        shortfall = split_scores[best] - split_scores[name]
        error = shortfall.std(ddof=1) / np.sqrt(len(shortfall))
        if shortfall.mean() <= error:
            if name == best:
                return best, f"{best} has the best held-out score ({top:.4f}); no simpler model is within one " \
                             "standard error of it"
            return name, (f"{name} is the simplest model within one standard error of the best, {best} "
                          f"({top:.4f}): {shortfall.mean():.4f} behind on average over {len(shortfall)} held-out "
                          f"splits, standard error {error:.4f}")
    return best, f"{best} has the best held-out score ({top:.4f})"
