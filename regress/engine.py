"""The one evaluation engine: every model scored on held-out tissue, one sample in memory at a time.

Two passes over a source's samples (`regress.source`), each a list of independent per-sample calls: run one after
the other in this process by default (a plain loop, no Dask), or submitted unchanged as tasks to an existing
`dask.distributed` cluster (`--scheduler`; `regress.tasks`):

1. `gather_sample`: the sample's matrix -> ridge's sufficient statistics (`MomentStats`) per stratum
   (`regress.splits`), and a bounded subsample of rows, stratified by role and block, for the models that train on
   rows (LightGBM, the spatial baseline);
2. `score_sample`: the sample's held-out rows predicted by the models of the splits that hold them out, a block of
   rows at a time -> per-nucleus Spearman and MSE, per-gene sums for Pearson (and, for a `sink`, the predictions).

Every split and every tuning fold is a union of strata, so ridge for every split, fold and alpha follows from the
statistics of pass 1 without another look at the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from regress.families import InputLayout, ModelSpec
from regress.metrics import (cellwise_mse, cellwise_spearman, default_region_radius, gene_moments, held_out_regions,
                             official_score, pearson_from_moments)
from regress.ridge import MomentStats
from regress.selection import best_model
from regress.settings import FitSettings
from regress.source import SampleInfo, Source
from regress.splits import (NO_BLOCK, choose_protocol, evaluation_splits, needs_blocks, region_labels, roles,
                            spatial_blocks, strata_table, tunes_by_sample, tuning_labels)
from regress.tasks import compute
from slidedata.progress import progress_bar

PREDICT_BLOCK = 20000  # rows predicted and scored at a time
ALPHA_SCORING_ROWS = 3000  # rows per tuning fold on which ridge's alphas are scored by the cell-wise Spearman
SCORE_COLUMNS = ["model", "spearman_official", "spearman_mean", "mse", "gene_pearson", "fit_seconds", "n_eval"]


@dataclass
class RowSample:
    """A bounded subsample of measured rows (all rows where there are few), in sample then cache order."""

    X: np.ndarray  # feature rows
    Y: np.ndarray  # float32 expression
    strata: list  # stratum key of each row
    coords: np.ndarray  # (y, x)
    codes: np.ndarray  # sample code of each row

    @staticmethod
    def concat(parts: list["RowSample"]) -> "RowSample":
        return RowSample(np.concatenate([p.X for p in parts]), np.concatenate([p.Y for p in parts]),
                         [k for p in parts for k in p.strata], np.concatenate([p.coords for p in parts]),
                         np.concatenate([p.codes for p in parts]))

    def take(self, strata: frozenset) -> "RowSample":
        keep = np.array([k in strata for k in self.strata], dtype=bool)
        return RowSample(self.X[keep], self.Y[keep], [k for k, y in zip(self.strata, keep) if y], self.coords[keep],
                         self.codes[keep])


@dataclass
class Gathered:
    """What pass 1 learns from every sample: statistics per stratum and the row subsample."""

    source: Source
    protocol: str  # resolved, never 'auto'
    with_blocks: bool
    n_blocks: int
    stats: dict  # stratum key -> MomentStats of the columns the statistics-trained models read (`stat_columns`)
    rows: RowSample
    layouts: dict  # model name -> InputLayout: its columns of the gathered matrix
    stat_columns: slice | np.ndarray  # the columns of the gathered matrix that `stats` cover

    @property
    def strata(self) -> pd.DataFrame:
        return strata_table(self.stats)

    def keys(self, positions: np.ndarray) -> frozenset:
        """The stratum keys at `positions` of the strata table."""
        return frozenset(map(tuple, self.strata.to_numpy()[positions].tolist()))


@dataclass
class HeldOutPredictions:
    """One model's predictions of one sample's held-out rows in one split: what a `sink` receives."""

    split: int
    model: str
    sample: str
    cell_id: np.ndarray
    coords: np.ndarray
    truth: np.ndarray
    predictions: np.ndarray


@dataclass
class Evaluation:
    protocol: str
    scores: pd.DataFrame  # one row per model (SCORE_COLUMNS)
    gene_scores: dict[str, np.ndarray]  # model -> per-gene Pearson
    split_scores: dict[str, np.ndarray]  # model -> official Spearman of each split (empty with a single split)
    test_samples: list[list[str]]  # the samples each split scores


@dataclass
class _SplitScores:
    """Pass 2 of one sample for one split."""

    spearman: dict  # model -> (n,) per-nucleus Spearman
    mse: dict  # model -> (n,) per-nucleus MSE
    moments: dict  # model -> gene_moments
    coords: np.ndarray
    regions: np.ndarray  # held-out block or sample of each row; -1 under 'validation'
    predictions: list  # HeldOutPredictions, kept only for a sink


# -- per-sample tasks ----------------------------------------------------------------------------------------------
def _strata_of(matrix, info: SampleInfo, n_blocks: int, with_blocks: bool) -> tuple[list, np.ndarray]:
    """Stratum key of every row (None where unmeasured or held out for the challenge) and its spatial block."""
    blocks = spatial_blocks(matrix.coords, info.code, n_blocks)
    role = roles(matrix.group, np.asarray(matrix.measured, bool))
    keys = [(info.code, int(r), int(b) if with_blocks else NO_BLOCK) if r >= 0 else None
            for r, b in zip(role.tolist(), blocks.tolist())]
    return keys, blocks


def gather_sample(source: Source, info: SampleInfo, n_blocks: int, with_blocks: bool, max_rows: int,
                  random_state: int = 0, columns: slice | np.ndarray = slice(None)) -> tuple[dict, RowSample]:
    """Statistics per stratum (of the feature `columns` the statistics-trained models read) and a subsample of
    `max_rows` rows at most, the same share of every role and spatial block."""
    matrix = source.matrix(info)
    keys, blocks = _strata_of(matrix, info, n_blocks, with_blocks)
    rows_of: dict = {}
    for row, key in enumerate(keys):
        if key is not None:
            rows_of.setdefault(key, []).append(row)
    stats = {key: MomentStats.of(_columns(matrix.X, rows, columns), matrix.Y[rows]) for key, rows in rows_of.items()}
    measured = np.flatnonzero([key is not None for key in keys])
    if len(measured) > max_rows:
        rng = np.random.default_rng(random_state + info.code)
        strata = pd.Series(list(zip([keys[i][1] for i in measured], blocks[measured].tolist())))
        chosen = []
        for _, where in strata.groupby(strata).indices.items():
            take = int(round(max_rows * len(where) / len(measured)))
            chosen.append(measured[rng.choice(where, size=min(take, len(where)), replace=False)])
        measured = np.sort(np.concatenate(chosen))
    rows = RowSample(matrix.X[measured], matrix.Y[measured].astype(np.float32), [keys[i] for i in measured],
                     matrix.coords[measured], np.full(len(measured), info.code))
    return stats, rows


def _columns(X: np.ndarray, rows: list, columns: slice | np.ndarray) -> np.ndarray:
    """X[rows, columns] for a slice or an index array of columns."""
    return X[rows, columns] if isinstance(columns, slice) else X[rows][:, columns]


def score_sample(source: Source, info: SampleInfo, n_blocks: int, with_blocks: bool, layouts: dict,
                 work: list[tuple[int, frozenset, dict]], protocol: str, keep_predictions: bool = False
                 ) -> dict[int, _SplitScores]:
    """For each (split, strata held out here, {model: fitted estimator}): scores of the held-out rows."""
    matrix = source.matrix(info)
    keys, blocks = _strata_of(matrix, info, n_blocks, with_blocks)
    out = {}
    for split, held, models in work:
        rows = np.flatnonzero([k in held for k in keys])
        scores = _SplitScores({}, {}, {}, matrix.coords[rows], region_labels(protocol, info.code, blocks[rows]), [])
        for name, estimator in models.items():
            spearman, mse, moments, kept = [], [], 0.0, []
            for start in range(0, len(rows), PREDICT_BLOCK):
                block = rows[start: start + PREDICT_BLOCK]
                predictions = estimator.predict(layouts[name].take(matrix.X[block], matrix.coords[block], info.code))
                spearman.append(cellwise_spearman(matrix.Y[block], predictions))
                mse.append(cellwise_mse(matrix.Y[block], predictions))
                moments = moments + gene_moments(matrix.Y[block], predictions)
                if keep_predictions:
                    kept.append(predictions)
            scores.spearman[name] = np.concatenate(spearman) if spearman else np.zeros(0)
            scores.mse[name] = np.concatenate(mse) if mse else np.zeros(0)
            scores.moments[name] = moments
            if keep_predictions:
                scores.predictions.append(HeldOutPredictions(
                    split, name, info.name, matrix.cell_id[rows], matrix.coords[rows], matrix.Y[rows],
                    np.concatenate(kept) if kept else np.zeros((0, matrix.Y.shape[1]), np.float32)))
        out[split] = scores
    return out


# -- the driver ----------------------------------------------------------------------------------------------------
def gather(source: Source, settings: FitSettings, progress: bool = True) -> Gathered:
    """Pass 1 over every sample of `source`, under the protocol `settings` asks for (resolved here)."""
    samples = source.samples
    n_training = sum(bool(s.n_train) for s in samples)
    protocol = choose_protocol(settings.protocol, any(s.n_validation for s in samples), n_training)
    with_blocks = needs_blocks(protocol, n_training, settings.tuning_folds)
    total = sum(s.n_measured for s in samples)
    layouts = model_layouts(source, settings)
    stat_columns = _as_slice(np.unique(np.concatenate(
        [np.zeros(0, np.int64)] + [_indices_of(layouts[s.name].columns) for s in map(ModelSpec.parse, settings.models)
                                   if s.family.trains_from == "statistics" and s.family.reads == "features"])))
    parts = compute(gather_sample, [(source, s, settings.n_blocks, with_blocks,
                                     max(1, int(round(settings.sample_rows * s.n_measured / total))), 0, stat_columns)
                                    for s in samples], settings.scheduler, "statistics", progress)
    stats = {}
    for part, _ in parts:
        stats.update(part)
    return Gathered(source, protocol, with_blocks, settings.n_blocks, stats,
                    RowSample.concat([rows for _, rows in parts]), layouts, stat_columns)


def model_layouts(source: Source, settings: FitSettings) -> dict[str, InputLayout]:
    """{model name: where its inputs are} in the matrices of `source` (built for `settings.gathered_features`)."""
    built = settings.gathered_features
    return {name: ModelSpec.parse(name).layout(built, settings.features, source.base_dim, source.scale_sets)
            for name in settings.models}


def _indices_of(columns: slice | np.ndarray) -> np.ndarray:
    """The column indices that a slice (with its stop) or an index array selects."""
    return np.arange(columns.stop)[columns] if isinstance(columns, slice) else np.asarray(columns)


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """A slice where the indices are one run (numpy then takes a view, not a copy)."""
    if not len(index):
        return slice(0, 0)
    if np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def fit_model(name: str, gathered: Gathered, strata: frozenset, settings: FitSettings):
    """Model `name` fitted on the rows of `strata`: a statistics-trained family from every row's statistics
    (`regress.families.StatisticsTrained`), the others on their rows of the bounded subsample."""
    spec, layout = ModelSpec.parse(name), gathered.layouts[name]
    by_sample = tunes_by_sample(len({k[0] for k in strata}), settings.tuning_folds)
    estimator = spec.make(settings, layout)
    if spec.family.trains_from == "statistics":
        keys = sorted(strata)
        stats = [gathered.stats[k] for k in keys]
        if spec.family.reads == "features":  # its columns among those the statistics cover
            within = _as_slice(np.searchsorted(_indices_of(gathered.stat_columns), _indices_of(layout.columns)))
            stats = [part.select(within) for part in stats]
        return estimator.fit_statistics(stats, tuning_labels(keys, by_sample),
                                        lambda positions: _scoring_rows(layout, gathered,
                                                                        frozenset(keys[i] for i in positions)))
    rows = gathered.rows.take(strata)
    labels = tuning_labels(rows.strata, by_sample)
    return estimator.fit(layout.take(rows.X, rows.coords, rows.codes), rows.Y,
                         groups=pd.factorize(labels)[0] if by_sample else labels)


def _scoring_rows(layout: InputLayout, gathered: Gathered, strata: frozenset, max_rows: int = ALPHA_SCORING_ROWS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(a model's inputs, expression) of at most `max_rows` subsample rows of `strata`, evenly spread."""
    rows = gathered.rows.take(strata)
    keep = np.unique(np.linspace(0, len(rows.Y) - 1, min(max_rows, len(rows.Y))).round().astype(int)) \
        if len(rows.Y) else np.zeros(0, int)
    return layout.take(rows.X[keep], rows.coords[keep], rows.codes[keep]), rows.Y[keep]


def evaluate(source: Source, settings: FitSettings, progress: bool = True,
             sink: Callable[[HeldOutPredictions], None] | None = None, gathered: Gathered | None = None
             ) -> Evaluation:
    """Every model of `settings` fitted on each split's training strata and scored on its held-out ones.

    `sink`, when given, receives every model's held-out predictions (a benchmark's maps, spot averages).
    """
    gathered = gathered or gather(source, settings, progress)
    protocol, strata = gathered.protocol, gathered.strata
    names = [s.name for s in source.samples]
    splits = [(gathered.keys(a), gathered.keys(b))
              for a, b in evaluation_splits(strata, protocol, settings.n_folds, names)]
    fitted, fit_seconds = {}, {m: 0.0 for m in settings.models}
    jobs = [(i, train, name) for i, (train, _) in enumerate(splits) for name in settings.models]
    for i, train, name in progress_bar(jobs, desc="fitting", unit="model", enabled=progress):
        start = time.perf_counter()
        fitted[i, name] = fit_model(name, gathered, train, settings)
        fit_seconds[name] += time.perf_counter() - start
    calls, owners = [], []
    for info in source.samples:
        work = [(i, frozenset(k for k in test if k[0] == info.code), {m: fitted[i, m] for m in settings.models})
                for i, (_, test) in enumerate(splits) if any(k[0] == info.code for k in test)]
        if work:
            calls.append((source, info, gathered.n_blocks, gathered.with_blocks, gathered.layouts, work, protocol,
                          sink is not None))
            owners.append(info)

    def hand_over(result: dict[int, _SplitScores]) -> dict[int, _SplitScores]:
        """Give a sample's held-out predictions to the sink as soon as they arrive, and keep only its scores."""
        for split in sorted(result):
            for held in result[split].predictions:
                sink(held)
            result[split].predictions = []
        return result

    results = compute(score_sample, calls, settings.scheduler, "held-out predictions", progress,
                      each=hand_over if sink is not None else None)
    # split order, then sample order, then row order
    per_split = [[(info, r[i]) for info, r in zip(owners, results) if i in r] for i in range(len(splits))]
    return _summarise(per_split, settings.models, fit_seconds, protocol, progress)


def _summarise(per_split: list, models: tuple[str, ...], fit_seconds: dict, protocol: str, progress: bool
               ) -> Evaluation:
    samples = np.concatenate([np.full(len(s.coords), info.name, dtype=object) for part in per_split
                              for info, s in part])
    coords = np.concatenate([s.coords for part in per_split for _, s in part])
    if protocol == "validation":  # the connected patches of held-out nuclei, as in the challenge
        regions = held_out_regions(coords, samples, default_region_radius(coords))
    else:
        regions = np.concatenate([s.regions for part in per_split for _, s in part])
    bounds = np.cumsum([0] + [sum(len(s.coords) for _, s in part) for part in per_split])
    rows, gene_scores, split_scores = [], {}, {}
    for name in models:
        spearman = np.concatenate([s.spearman[name] for part in per_split for _, s in part])
        mse = np.concatenate([s.mse[name] for part in per_split for _, s in part])
        split_moments = [sum(s.moments[name] for _, s in part) for part in per_split]
        if len(per_split) > 1:
            # Per gene within each held-out split, then averaged: pooled over splits, the differences between
            # whole samples would dominate (the mean profile scored -0.27 across four real sections).
            gene_scores[name] = np.mean([pearson_from_moments(m) for m in split_moments], axis=0)
            split_scores[name] = np.array([official_score(spearman[a:b], samples[a:b], regions[a:b])
                                           for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            gene_scores[name] = pearson_from_moments(split_moments[0])
        scores = {"spearman_official": official_score(spearman, samples, regions),
                  "spearman_mean": float(spearman.mean()), "mse": float(mse.mean()),
                  "gene_pearson": float(gene_scores[name].mean())}
        rows.append({"model": name, **scores, "fit_seconds": fit_seconds[name], "n_eval": len(spearman)})
        if progress:
            print(f"  {name:<18} spearman {scores['spearman_official']:.4f}  mse {scores['mse']:.4f}  "
                  f"({fit_seconds[name]:.1f} s)", flush=True)
    test_samples = [[info.name for info, _ in part] for part in per_split]
    return Evaluation(protocol, pd.DataFrame(rows, columns=SCORE_COLUMNS), gene_scores, split_scores, test_samples)


@dataclass
class Selection:
    """What `select_and_fit` returns: the evaluation, the chosen model and why, and that model refitted."""

    evaluation: Evaluation
    best: str
    verdict: str  # the selection rule's reason, in words
    estimator: object
    gathered: Gathered


def select_and_fit(source: Source, settings: FitSettings, progress: bool = True,
                   sink: Callable[[HeldOutPredictions], None] | None = None) -> Selection:
    """Evaluate every model, choose one (`regress.selection.best_model`), refit it on every measured train and
    validation nucleus."""
    gathered = gather(source, settings, progress)
    evaluation = evaluate(source, settings, progress, sink, gathered)
    best, verdict = best_model(evaluation.scores, evaluation.split_scores)
    estimator = fit_model(best, gathered, frozenset(gathered.stats), settings)
    return Selection(evaluation, best, verdict, estimator, gathered)
