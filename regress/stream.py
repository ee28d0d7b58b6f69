"""The fit stage over the feature cache, one sample at a time: memory is bounded by the largest sample, not the data.

Three passes, each a set of independent per-sample Dask tasks, computed in this process by default or on an existing
`dask.distributed` cluster (`scheduler=ADDRESS`) unchanged:

1. `reducer_rows`: a bounded subsample of each wide feature block -> its principal axes (`FeatureReducer`);
2. `gather_sample`: the sample's feature matrix (reduced blocks, morphology, context) -> ridge's sufficient statistics
   (`MomentStats`) per *unit*, and a bounded subsample of rows, stratified by unit, for LightGBM and the spatial
   baseline;
3. `score_sample`: the sample's held-out rows predicted by the models of the splits that hold them out, a block of
   rows at a time -> per-nucleus Spearman and MSE, per-gene sums for Pearson.

A unit is (sample, role, spatial block): role 0 = measured train nucleus, 1 = measured validation nucleus; blocks are
kept only where a split or a tuning fold needs them. Every evaluation split (validation, leave one sample out,
spatial K-fold) and every tuning fold is a union of units, so ridge for every split, fold and alpha follows from the
statistics of pass 2 without another look at the data. The results equal the in-memory `regress.fit.evaluate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from regress.dataset import spatial_blocks
from regress.features import REDUCER_ROWS, FeatureReducer, FeatureSpec, column_groups, sample_features
from regress.metrics import (cellwise_mse, cellwise_spearman, default_patch_radius, gene_moments, held_out_patches,
                             official_score, pearson_from_moments)
from regress.models import MomentStats, ridge_fold_of
from slidedata.errors import DataError
from slidedata.feature_store import FeatureStore
from slidedata.sample import EXPRESSION, open_sample, sample_paths

ROLES = {"train": 0, "validation": 1}
PREDICT_BLOCK = 20000  # rows predicted and scored at a time


@dataclass(frozen=True)
class SampleInfo:
    """What the driver keeps of a sample: enough to plan, nothing of its data."""

    name: str
    path: str
    code: int  # index among the fit's samples: spatial block labels and tuning groups
    microns_per_pixel: float | None
    n_measured: tuple[int, int]  # measured train, measured validation nuclei


@dataclass(frozen=True)
class Split:
    """One evaluation split: the units it trains on and the units it scores."""

    train: frozenset
    test: frozenset


@dataclass
class Gathered:
    """Pass 2 of one sample."""

    stats: dict  # unit -> MomentStats of the full feature matrix
    rows: "RowSample"


@dataclass
class RowSample:
    """A bounded subsample of measured rows (all rows where there are few), in sample then cache order."""

    X: np.ndarray  # float16 feature rows
    Y: np.ndarray  # float32 expression
    units: list  # unit of each row
    coords: np.ndarray  # (y, x)
    codes: np.ndarray  # sample code of each row

    @staticmethod
    def concat(parts: list["RowSample"]) -> "RowSample":
        return RowSample(np.concatenate([p.X for p in parts]), np.concatenate([p.Y for p in parts]),
                         [u for p in parts for u in p.units], np.concatenate([p.coords for p in parts]),
                         np.concatenate([p.codes for p in parts]))

    def take(self, units: frozenset) -> "RowSample":
        keep = np.array([u in units for u in self.units], dtype=bool)
        return RowSample(self.X[keep], self.Y[keep], [u for u, k in zip(self.units, keep) if k], self.coords[keep],
                         self.codes[keep])


@dataclass
class SplitScores:
    """Pass 3 of one sample for one split: per held-out nucleus and per gene."""

    spearman: dict  # model -> (n,) per-nucleus Spearman
    mse: dict  # model -> (n,) per-nucleus MSE
    moments: dict  # model -> gene_moments
    coords: np.ndarray
    regions: np.ndarray  # held-out block or sample of each row (cross-validation); -1 under 'validation'


@dataclass
class StreamedFit:
    """Everything the fit stage learns from the data, for evaluation and the final model."""

    samples: list[SampleInfo]
    spec: FeatureSpec  # with context when any model uses it
    reducer: FeatureReducer | None
    base_dim: int
    genes: list[str]
    feature_settings: dict
    stats: dict = field(default_factory=dict)  # unit -> MomentStats
    rows: RowSample | None = None
    with_blocks: bool = False
    column_groups: np.ndarray | None = None  # per feature column, see regress.features.column_groups


# -- the driver's view of the samples ----------------------------------------------------------------------------
def plan_samples(data: str | Path, store: FeatureStore, spec: FeatureSpec, microns_per_pixel: float | None = None
                 ) -> tuple[list[SampleInfo], list[str], dict]:
    """Open each sample in turn (never two at once), check it against the first, keep what the plan needs.

    Returns the samples with measured expression, their genes, and the embedding settings of their entries.
    """
    infos, genes, settings, first = [], None, None, None
    for path in sample_paths(data):
        sample = open_sample(path, microns_per_pixel=microns_per_pixel)
        if not sample.has_expression:  # like DC1: can neither train nor score a model
            continue
        if genes is None:
            genes, first = sample.genes, sample.name
        elif sample.genes != genes:
            raise DataError(sample.path, EXPRESSION, f"genes differ from {first}'s (names or order)")
        nuclei = store.nuclei(sample, if_changed="raise")
        if settings is None:
            settings = store.settings(sample.name, spec.keys)
        else:
            store.check_settings(sample.name, settings, than=f"those of {first}", remedy="embed all samples alike")
        _, measured = sample.expression_of(nuclei["cell_id"].to_numpy(np.int64))
        group = sample.group_of(nuclei["cell_id"].to_numpy(np.int64))
        infos.append(SampleInfo(sample.name, str(sample.path), len(infos), sample.microns_per_pixel,
                                (int((measured & (group == "train")).sum()),
                                 int((measured & (group == "validation")).sum()))))
        del sample, nuclei
    if not infos:
        raise DataError(Path(data), EXPRESSION, "no sample has measured expression to learn from")
    if not any(info.n_measured[0] for info in infos):
        raise DataError(Path(data), "cell_id-group",
                        f"no training nuclei: none of the {len(infos)} sample(s) has a nucleus in group 'train' "
                        "with measured expression, so there is nothing to learn from")
    return infos, genes, settings


def choose_protocol(protocol: str, has_validation: bool, n_training_samples: int) -> str:
    """'auto' -> across samples when it can: the model must generalise to unseen tissue. (Both fits decide here.)"""
    if protocol != "auto":
        return protocol
    if has_validation:
        return "validation"
    return "loso" if n_training_samples >= 2 else "spatial-kfold"


def tunes_by_sample(n_samples: int, tuning_groups: str) -> bool:
    """Whether the estimators' own tuning folds are whole samples (else spatial blocks); both fits decide here."""
    if tuning_groups not in ("auto", "samples", "blocks"):
        raise ValueError(f"unknown tuning_groups '{tuning_groups}'; use auto, samples or blocks")
    return tuning_groups == "samples" or (tuning_groups == "auto" and n_samples >= 3)


# -- the per-sample tasks ------------------------------------------------------------------------------------------
def reducer_rows(cache: str, info: SampleInfo, spec: FeatureSpec, max_rows: int) -> dict[str, np.ndarray]:
    store = FeatureStore(cache)
    return FeatureReducer.subsample(store, info.name, FeatureReducer.wide_keys(store, info.name, spec), max_rows)


def _sample_matrix(cache: str, info: SampleInfo, spec: FeatureSpec, reducer: FeatureReducer | None,
                   n_blocks: int, with_blocks: bool):
    """(features, expression, unit per row or None) of one sample; opened here, so any worker can run it."""
    sample = open_sample(info.path, n_genes=None, microns_per_pixel=info.microns_per_pixel)
    store = FeatureStore(cache)
    nuclei = store.nuclei(sample, if_changed="raise")
    cell_ids = nuclei["cell_id"].to_numpy(np.int64)
    coords = nuclei[["y", "x"]].to_numpy(np.float64)
    X = sample_features(store, info.name, spec, nuclei, reducer)
    Y, measured = sample.expression_of(cell_ids)
    group = sample.group_of(cell_ids)
    blocks = spatial_blocks(coords, info.code, n_blocks)
    role = np.full(len(cell_ids), -1)
    for name, value in ROLES.items():
        role[measured & (group == name)] = value
    units = [(info.code, int(r), int(b) if with_blocks else -1) if r >= 0 else None
             for r, b in zip(role.tolist(), blocks.tolist())]
    return X, Y, units, coords, blocks


def gather_sample(cache: str, info: SampleInfo, spec: FeatureSpec, reducer: FeatureReducer | None, n_blocks: int,
                  with_blocks: bool, max_rows: int, random_state: int = 0) -> Gathered:
    """Ridge statistics per unit and a subsample of `max_rows` rows at most, stratified by role and block."""
    X, Y, units, coords, blocks = _sample_matrix(cache, info, spec, reducer, n_blocks, with_blocks)
    rows_of: dict = {}
    for row, unit in enumerate(units):
        if unit is not None:
            rows_of.setdefault(unit, []).append(row)
    stats = {unit: MomentStats.of(X[rows], Y[rows]) for unit, rows in rows_of.items()}
    measured = np.flatnonzero([unit is not None for unit in units])
    if len(measured) > max_rows:  # the same share of every role and spatial block
        rng = np.random.default_rng(random_state + info.code)
        strata = pd.Series(list(zip([units[i][1] for i in measured], blocks[measured].tolist())))
        chosen = []
        for _, where in strata.groupby(strata).indices.items():
            take = int(round(max_rows * len(where) / len(measured)))
            chosen.append(measured[rng.choice(where, size=min(take, len(where)), replace=False)])
        measured = np.sort(np.concatenate(chosen))
    rows = RowSample(X[measured], Y[measured].astype(np.float32), [units[i] for i in measured], coords[measured],
                     np.full(len(measured), info.code))
    return Gathered(stats, rows)


def score_sample(cache: str, info: SampleInfo, spec: FeatureSpec, reducer: FeatureReducer | None, n_blocks: int,
                 with_blocks: bool, base_dim: int, work: list[tuple[int, frozenset, dict]], protocol: str
                 ) -> dict[int, SplitScores]:
    """For each (split, units held out here, {model: fitted estimator}): scores of the held-out rows."""
    X, Y, units, coords, blocks = _sample_matrix(cache, info, spec, reducer, n_blocks, with_blocks)
    out = {}
    for split, held_units, models in work:
        rows = np.flatnonzero([u in held_units for u in units])
        regions = {"spatial-kfold": blocks[rows], "loso": np.full(len(rows), info.code)}.get(
            protocol, np.full(len(rows), -1))
        scores = SplitScores({}, {}, {}, coords[rows], regions)
        for name, estimator in models.items():
            spearman, mse, moments = [], [], 0.0
            for start in range(0, len(rows), PREDICT_BLOCK):
                block = rows[start: start + PREDICT_BLOCK]
                predictions = estimator.predict(model_rows(name, X[block], coords[block], info.code, base_dim))
                spearman.append(cellwise_spearman(Y[block], predictions))
                mse.append(cellwise_mse(Y[block], predictions))
                moments = moments + gene_moments(Y[block], predictions)
            scores.spearman[name] = np.concatenate(spearman) if spearman else np.zeros(0)
            scores.mse[name] = np.concatenate(mse) if mse else np.zeros(0)
            scores.moments[name] = moments
        out[split] = scores
    return out


def model_rows(name: str, X: np.ndarray, coords: np.ndarray, code, base_dim: int) -> np.ndarray:
    """What each model reads: positions for the spatial baseline, base or base+context features otherwise."""
    if name == "spatial-knn":
        return np.c_[coords, np.broadcast_to(code, len(coords))]
    return X if name.endswith("+context") else X[:, :base_dim]


# -- running tasks -------------------------------------------------------------------------------------------------
def compute(tasks: list, scheduler: str | None, desc: str, progress: bool = True) -> list:
    """Results of dask.delayed `tasks`: one at a time in this process (memory of one sample), or on the
    `dask.distributed` cluster at `scheduler` (an address such as tcp://host:8786)."""
    if scheduler is None:
        return [task.compute(scheduler="synchronous")
                for task in tqdm(tasks, desc=desc, unit="sample", disable=not progress)]
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        futures = client.compute(tasks)
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="sample", disable=not progress):
            pass
        return client.gather(futures)


# -- the driver ----------------------------------------------------------------------------------------------------
def gather(data: str | Path, cache: str | Path, spec: FeatureSpec, protocol: str, tuning_groups: str,
           n_blocks: int, max_rows: int, scheduler: str | None = None, progress: bool = True,
           microns_per_pixel: float | None = None) -> tuple[StreamedFit, str]:
    """Passes 1 and 2 over every sample with expression; returns what was learnt and the resolved protocol."""
    store = FeatureStore(cache)
    samples, genes, settings = plan_samples(data, store, spec, microns_per_pixel)
    protocol = choose_protocol(protocol, any(s.n_measured[1] for s in samples),
                               sum(bool(s.n_measured[0]) for s in samples))
    cache = str(cache)
    reducer = None
    if FeatureReducer.wide_keys(store, samples[0].name, spec):
        per_sample = max(1, REDUCER_ROWS // len(samples))
        parts = compute([dask.delayed(reducer_rows)(cache, s, spec, per_sample) for s in samples], scheduler,
                        "feature axes", progress)
        reducer = FeatureReducer.fit(parts, spec.block_components)
    training = [s for s in samples if s.n_measured[0]]
    # Blocks are kept where a split or a tuning fold is made of them; otherwise units are whole samples.
    with_blocks = protocol == "spatial-kfold" or not tunes_by_sample(len(training) - (protocol == "loso"),
                                                                      tuning_groups)
    total = sum(sum(s.n_measured) for s in samples)
    parts = compute([dask.delayed(gather_sample)(cache, s, spec, reducer, n_blocks, with_blocks,
                                                 max(1, int(round(max_rows * sum(s.n_measured) / total))))
                     for s in samples], scheduler, "statistics", progress)
    dim = next(iter(parts[0].stats.values())).mean_x.shape[0] if parts[0].stats else parts[0].rows.X.shape[1]
    fit = StreamedFit(samples, spec, reducer, dim // 2 if spec.has_context else dim, genes, settings,
                      with_blocks=with_blocks, column_groups=column_groups(store, samples[0].name, spec, reducer))
    for part in parts:
        fit.stats.update(part.stats)
    fit.rows = RowSample.concat([p.rows for p in parts])
    return fit, protocol


def evaluation_splits(fit: StreamedFit, protocol: str, n_folds: int) -> list[Split]:
    """The splits of `regress.fit.evaluation_splits`, as sets of units."""
    units = list(fit.stats)
    train = [u for u in units if u[1] == 0]
    if protocol == "validation":
        validation = [u for u in units if u[1] == 1]
        if not validation:
            raise ValueError("no validation nucleus has measured expression; use --protocol spatial-kfold or loso")
        return [Split(frozenset(train), frozenset(validation))]
    if protocol == "loso":
        codes = sorted({u[0] for u in train}, key=lambda c: fit.samples[c].name)
        if len(codes) < 2:
            raise ValueError("leave-one-sample-out needs two or more samples with expression")
        return [Split(frozenset(u for u in train if u[0] != c), frozenset(u for u in train if u[0] == c))
                for c in codes]
    if protocol == "spatial-kfold":
        blocks = np.unique([u[2] for u in train])
        fold_of = dict(zip(blocks.tolist(), (np.random.default_rng(0).permutation(len(blocks)) % n_folds).tolist()))
        splits = [Split(frozenset(u for u in train if fold_of[u[2]] != k), frozenset(u for u in train
                                                                                     if fold_of[u[2]] == k))
                  for k in range(n_folds)]
        return [s for s in splits if s.test]
    raise ValueError(f"unknown protocol '{protocol}'")


def tuning_label(unit: tuple, by_sample: bool) -> int:
    return unit[0] if by_sample else unit[2]


def fit_model(name: str, fit: StreamedFit, units: frozenset, settings) -> object:
    """The model `name` fitted on the rows of `units`: ridge from their statistics, LightGBM and the spatial
    baseline on their rows of the bounded subsample."""
    from regress.fit import make_estimator

    n_samples = len({u[0] for u in units})
    by_sample = tunes_by_sample(n_samples, settings.tuning_groups)
    width = None if name.endswith("+context") else fit.base_dim
    estimator = make_estimator(name, settings, fit.column_groups[:width])
    base = name.split("+")[0]
    if base in ("ridge", "mean-profile"):
        labels = sorted(units)
        groups = np.array([tuning_label(u, by_sample) for u in labels])
        if base == "mean-profile":
            return estimator.fit_statistics(MomentStats.combine([fit.stats[u] for u in labels]))
        fold_of = ridge_fold_of(groups, estimator.n_folds, estimator.random_state)
        folds = {}
        for unit, group in zip(labels, groups.tolist()):
            stats = fit.stats[unit] if width is None else fit.stats[unit].columns(width)
            folds.setdefault(fold_of[group], []).append(stats)
        return estimator.fit_statistics([MomentStats.combine(folds[k]) for k in sorted(folds)])
    rows = fit.rows.take(units)
    inputs = model_rows(name, rows.X, rows.coords, rows.codes, fit.base_dim)
    groups = np.array([tuning_label(u, by_sample) for u in rows.units])
    if by_sample:  # as the in-memory fit numbers them: by order of appearance
        groups = pd.factorize(groups)[0]
    return estimator.fit(inputs, rows.Y, groups=groups)


def score_splits(fit: StreamedFit, cache: str | Path, splits: list[Split], models: tuple[str, ...], settings,
                 protocol: str, scheduler: str | None, progress: bool = True):
    """Fit every model on every split's training units, score it on the held-out units (pass 3)."""
    fitted, fit_seconds = {}, {m: 0.0 for m in models}
    jobs = [(index, split, name) for index, split in enumerate(splits) for name in models]
    for index, split, name in tqdm(jobs, desc="fitting", unit="model", disable=not progress):
        start = time.perf_counter()
        fitted[index, name] = fit_model(name, fit, split.train, settings)
        fit_seconds[name] += time.perf_counter() - start
    tasks, owners = [], []
    for info in fit.samples:
        work = [(i, frozenset(u for u in s.test if u[0] == info.code), {m: fitted[i, m] for m in models})
                for i, s in enumerate(splits) if any(u[0] == info.code for u in s.test)]
        if work:
            tasks.append(dask.delayed(score_sample)(str(cache), info, fit.spec, fit.reducer, settings.n_blocks,
                                                    fit.with_blocks, fit.base_dim, work, protocol))
            owners.append(info)
    results = compute(tasks, scheduler, "held-out predictions", progress)
    # split order, then sample order, then cache order: the order of the in-memory evaluation
    per_split = [[(info, r[i]) for info, r in zip(owners, results) if i in r] for i in range(len(splits))]
    return per_split, fit_seconds


def evaluate_streamed(fit: StreamedFit, cache: str | Path, protocol: str, settings, scheduler: str | None = None,
                      progress: bool = True):
    """Every model's held-out scores under `protocol` (a `regress.fit.Evaluation`), as `regress.fit.evaluate`
    computes them in memory."""
    from regress.fit import SCORE_COLUMNS, Evaluation, report_model

    splits = evaluation_splits(fit, protocol, settings.n_folds)
    per_split, fit_seconds = score_splits(fit, cache, splits, settings.models, settings, protocol, scheduler,
                                          progress)
    samples = np.concatenate([np.full(len(s.coords), info.name, dtype=object) for part in per_split
                              for info, s in part])
    coords = np.concatenate([s.coords for part in per_split for _, s in part])
    if protocol == "validation":  # the connected patches of held-out nuclei, as in the challenge
        regions = held_out_patches(coords, samples, default_patch_radius(coords))
    else:
        regions = np.concatenate([s.regions for part in per_split for _, s in part])
    bounds = np.cumsum([0] + [sum(len(s.coords) for _, s in part) for part in per_split])
    rows, gene_scores, fold_scores = [], {}, {}
    for name in settings.models:
        spearman = np.concatenate([s.spearman[name] for part in per_split for _, s in part])
        mse = np.concatenate([s.mse[name] for part in per_split for _, s in part])
        split_moments = [sum(s.moments[name] for _, s in part) for part in per_split]
        if len(splits) > 1:  # per gene within each held-out split, then averaged (see regress.fit.evaluate)
            gene_scores[name] = np.mean([pearson_from_moments(m) for m in split_moments], axis=0)
            fold_scores[name] = np.array([official_score(spearman[a:b], samples[a:b], regions[a:b])
                                          for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            gene_scores[name] = pearson_from_moments(split_moments[0])
        scores = {"spearman_official": official_score(spearman, samples, regions),
                  "spearman_mean": float(spearman.mean()), "mse": float(mse.mean()),
                  "gene_pearson": float(gene_scores[name].mean())}
        rows.append({"model": name, **scores, "fit_seconds": fit_seconds[name], "n_eval": len(spearman)})
        if progress:
            report_model(name, scores, fit_seconds[name])
    return Evaluation(protocol, pd.DataFrame(rows, columns=SCORE_COLUMNS), gene_scores, fold_scores, held=None)


def labelled_units(fit: StreamedFit) -> frozenset:
    """Every measured train and validation unit: what the saved model is refitted on."""
    return frozenset(fit.stats)
