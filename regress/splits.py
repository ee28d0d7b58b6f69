"""How the fit holds tissue out: strata of nuclei, evaluation splits over them, tuning folds and scoring regions.

A *stratum* is (sample, role, spatial block): role 0 = measured 'train' nucleus, 1 = measured 'validation' nucleus;
the block is -1 where no split or tuning fold needs blocks. Every evaluation split and every tuning fold is a union of
strata, built once over the table of strata with scikit-learn's splitters, then mapped to rows:

* 'validation': train on the 'train' strata, score the 'validation' ones (`PredefinedSplit`);
* 'loso': leave one sample out (`LeaveOneGroupOut` over samples);
* 'spatial-kfold': whole spatial blocks of the train strata, assigned to K folds at random (`PredefinedSplit`).

Neighbouring nuclei share signal, so nothing is ever split at random row by row. The models' own tuning folds are
whole groups too, assigned here and nowhere else (`group_folds`, `row_folds`, `tuning_split`, `member_holdouts`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import LeaveOneGroupOut, PredefinedSplit

TRAIN, VALIDATION = 0, 1
ROLES = {"train": TRAIN, "validation": VALIDATION}
NO_BLOCK = -1


def spatial_blocks(coords: np.ndarray, code: int, n_blocks: int) -> np.ndarray:
    """Block label of each nucleus of one sample (`code`: its index among the samples): the extent of all its nuclei
    cut into n_blocks x n_blocks squares; labels of different samples never meet."""
    lo, hi = coords.min(0), coords.max(0) + 1e-6
    cell = np.floor((coords - lo) / (hi - lo) * n_blocks).astype(np.int64)
    return (code * n_blocks + cell[:, 0]) * n_blocks + cell[:, 1]


def roles(group: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Role of each nucleus: TRAIN, VALIDATION, or -1 (unmeasured, or held out for the challenge)."""
    out = np.full(len(group), -1, dtype=np.int64)
    for name, value in ROLES.items():
        out[measured & (group == name)] = value
    return out


def choose_protocol(protocol: str, has_validation: bool, n_training_samples: int) -> str:
    """'auto' -> across samples when it can: the model must generalise to unseen tissue."""
    if protocol != "auto":
        return protocol
    if has_validation:
        return "validation"
    return "loso" if n_training_samples >= 2 else "spatial-kfold"


def tunes_by_sample(n_samples: int, tuning_folds: str) -> bool:
    """Whether the models' own tuning folds are whole samples (else spatial blocks)."""
    return tuning_folds == "samples" or (tuning_folds == "auto" and n_samples >= 3)


def needs_blocks(protocol: str, n_training_samples: int, tuning_folds: str) -> bool:
    """Whether strata keep their spatial block: where a split or a tuning fold is made of blocks."""
    inner = n_training_samples - (protocol == "loso")  # samples that train each split's model
    return protocol == "spatial-kfold" or not tunes_by_sample(inner, tuning_folds)


def strata_table(keys) -> pd.DataFrame:
    """One row per stratum key (sample code, role, block), in sorted order."""
    return pd.DataFrame(sorted(keys), columns=["sample", "role", "block"])


def evaluation_splits(strata: pd.DataFrame, protocol: str, n_folds: int, sample_names: list[str]
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions into `strata` for each split of `protocol` (not 'auto')."""
    train = np.flatnonzero(strata["role"].to_numpy() == TRAIN)
    if protocol == "validation":
        test_fold = np.where(strata["role"].to_numpy() == VALIDATION, 0, -1)
        if not (test_fold == 0).any():
            raise ValueError("no validation nucleus has measured expression; use --protocol spatial-kfold or loso")
        return [(a, b) for a, b in PredefinedSplit(test_fold).split()]
    if protocol == "loso":
        names = np.asarray(sample_names, dtype=object)[strata["sample"].to_numpy()[train]]
        if len(set(names)) < 2:
            raise ValueError("leave-one-sample-out needs two or more samples with expression")
        return [(train[a], train[b]) for a, b in LeaveOneGroupOut().split(train, groups=names)]
    if protocol == "spatial-kfold":
        blocks = strata["block"].to_numpy()[train]
        fold_of = group_folds(blocks, n_folds, random_state=0)
        test_fold = np.array([fold_of[b] for b in blocks.tolist()], dtype=np.int64)
        return [(train[a], train[b]) for a, b in PredefinedSplit(test_fold).split()]
    raise ValueError(f"unknown protocol '{protocol}'")


def tuning_labels(keys: list[tuple[int, int, int]], by_sample: bool) -> np.ndarray:
    """The label of each stratum key (or row's key) for the models' own tuning folds: its sample, or its block."""
    return np.array([key[0] if by_sample else key[2] for key in keys], dtype=np.int64)


def region_labels(protocol: str, code: int, blocks: np.ndarray) -> np.ndarray:
    """Held-out region of each scored nucleus of one sample for the official aggregation: what cross-validation held
    out (its spatial block, or the whole sample); -1 under 'validation', whose regions are the connected patches of
    held-out nuclei as in the challenge (`regress.metrics.held_out_regions`)."""
    if protocol == "spatial-kfold":
        return blocks
    if protocol == "loso":
        return np.full(len(blocks), code)
    return np.full(len(blocks), -1)


# -- the models' own tuning folds -----------------------------------------------------------------------------------
def group_folds(groups: np.ndarray, n_folds: int, random_state: int = 0) -> dict:
    """{group label: fold}: whole groups (samples, spatial blocks) assigned to at most `n_folds` folds at random."""
    unique = np.unique(groups)
    shuffled = np.random.default_rng(random_state).permutation(len(unique))
    return dict(zip(unique.tolist(), (shuffled % min(n_folds, len(unique))).tolist()))


def row_folds(n_rows: int, groups: np.ndarray | None, n_folds: int, random_state: int = 0) -> np.ndarray:
    """The fold of each row: its group's (`group_folds`), or a random one where no groups are given."""
    if groups is None:
        return np.random.default_rng(random_state).integers(0, n_folds, n_rows)
    fold_of = group_folds(groups, n_folds, random_state)
    return np.array([fold_of[g] for g in np.asarray(groups).tolist()], dtype=np.int64)


def tuning_split(n_rows: int, groups: np.ndarray | None, random_state: int = 0) -> np.ndarray:
    """Rows held out to tune a row-trained model (early stopping, a grid): a fifth of the groups (whole samples or
    blocks, at least one) when `groups` is given, else a random fifth of the rows."""
    rng = np.random.default_rng(random_state)
    if groups is not None and len(np.unique(groups)) > 1:  # one group cannot be both trained on and held out
        unique = np.unique(groups)
        return np.isin(groups, rng.choice(unique, size=max(len(unique) // 5, 1), replace=False))
    return rng.random(n_rows) < 0.2


def member_holdouts(n_rows: int, groups: np.ndarray | None, n_members: int, random_state: int) -> list[np.ndarray]:
    """The held-out rows of each member of an ensemble: whole groups in turn (the groups split into as many chunks
    as members, at most one per group; member i holds out chunk i modulo their number), else a random fifth."""
    rng = np.random.default_rng(random_state)
    if groups is None or len(np.unique(groups)) < 2:
        return [rng.random(n_rows) < 0.2 for _ in range(n_members)]
    chunks = np.array_split(rng.permutation(np.unique(groups)), min(n_members, len(np.unique(groups))))
    return [np.isin(groups, chunks[m % len(chunks)]) for m in range(n_members)]


def scored_rows(candidates: np.ndarray, max_rows: int, random_state: int = 0) -> np.ndarray:
    """At most `max_rows` of the row indices `candidates`, drawn at random and sorted: the held-out rows a tuning
    step scores by the cell-wise Spearman (ranking every gene of every row costs)."""
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(candidates, size=min(max_rows, len(candidates)), replace=False))
