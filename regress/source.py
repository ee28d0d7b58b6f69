"""Where the fit's per-sample matrices come from: the feature cache (`CacheSource`) or arrays in memory
(`ArraySource`). The evaluation engine (`regress.engine`) reads either the same way, one sample at a time.

A source knows its samples (`SampleInfo`, what the driver keeps: no data), their genes and how their features were
made, and returns one sample's `SampleMatrix` on demand. Every check of the training data (same genes in the same
order, features embedded alike, something to learn from) is made here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from regress.features import REDUCER_ROWS, FeatureReducer, FeatureSpec, sample_features, scale_sets
from regress.tasks import compute
from slidedata.errors import DataError
from slidedata.feature_store import FeatureStore
from slidedata.sample import EXPRESSION, GROUPS, Elements, check_panel, open_sample, sample_paths


@dataclass(frozen=True)
class SampleInfo:
    """What the driver keeps of a sample: enough to plan, nothing of its data."""

    name: str
    code: int  # index among the source's samples: spatial block labels and tuning labels
    n_train: int  # measured nuclei of the group 'train'
    n_validation: int  # measured nuclei of the group 'validation'
    path: str = ""  # the sample's zarr (cache sources)

    @property
    def n_measured(self) -> int:
        return self.n_train + self.n_validation


@dataclass
class SampleMatrix:
    """One sample's nuclei, aligned: features, measured expression, group and position."""

    name: str
    cell_id: np.ndarray  # (n,) int64
    coords: np.ndarray  # (n, 2) centroid (y, x) in px
    group: np.ndarray  # (n,) 'train' | 'validation' | 'test' | 'unassigned'
    measured: np.ndarray  # (n,) bool: the nucleus has measured expression
    X: np.ndarray  # (n, f) features (float16 from the cache)
    Y: np.ndarray  # (n, g) float32 expression; rows where `measured` is False are not read

    def __len__(self) -> int:
        return len(self.cell_id)


def check_trainable(samples: list[SampleInfo], where: Path | str) -> None:
    """Refuse data that no model can learn from."""
    if not samples:
        raise DataError(where, EXPRESSION, "no sample has measured expression to learn from")
    if not any(s.n_train for s in samples):
        raise DataError(where, GROUPS, f"no training nuclei: none of the {len(samples)} sample(s) has a nucleus in "
                                       "group 'train' with measured expression, so there is nothing to learn from")


@dataclass
class CacheSource:
    """The samples of a data folder (those with measured expression) with their cached features.

    Holds paths and settings only, so it travels to Dask workers; each `matrix` call opens its sample there.
    """

    data: str
    cache: str
    spec: FeatureSpec
    samples: list[SampleInfo]
    genes: list[str]
    feature_settings: dict  # 'encoder:patch_size' -> the embedding settings, the same for every sample
    reducer: FeatureReducer | None = None
    scale_sets: np.ndarray | None = None  # per feature column, see regress.features.scale_sets
    elements: Elements | None = None  # where the samples' parts are (None: the challenge's names)

    @classmethod
    def open(cls, data: str | Path, cache: str | Path, spec: FeatureSpec, reducer: FeatureReducer | None = None,
             scheduler: str | None = None, progress: bool = True, elements: Elements | None = None
             ) -> "CacheSource":
        """Check every sample in turn (never two at once) against the first, then fit the principal axes of the
        wide feature blocks (`reducer`, unless given) from a bounded subsample of every sample's rows."""
        store = FeatureStore(cache, create=False)  # never embeds: a missing cache is an error
        samples, genes, settings, first, first_file = [], None, None, None, None
        for path in sample_paths(data):
            sample = open_sample(path, elements=elements)
            if not sample.has_expression:  # like DC1: can neither train nor score a model
                continue
            if genes is None:  # the panel comes from the data: the first sample with expression sets it
                genes, first, first_file = sample.genes, sample.name, sample.path.name
            else:
                check_panel(sample, genes, first_file)
            nuclei = store.nuclei(sample, if_changed="raise")
            if settings is None:
                settings = store.settings(sample.name, spec.keys)
            else:
                store.check_settings(sample.name, settings, than=f"those of {first}", remedy="embed all samples alike")
            cell_ids = nuclei["cell_id"].to_numpy(np.int64)
            _, measured = sample.expression_of(cell_ids)
            group = sample.group_of(cell_ids)
            samples.append(SampleInfo(sample.name, len(samples), int((measured & (group == "train")).sum()),
                                      int((measured & (group == "validation")).sum()), str(sample.path)))
            del sample, nuclei
        check_trainable(samples, Path(data))
        source = cls(str(data), str(cache), spec, samples, genes, settings, elements=elements)
        keys = FeatureReducer.wide_keys(store, samples[0].name, spec)
        if reducer is None and keys:
            per_sample = max(1, REDUCER_ROWS // len(samples))
            parts = compute(_reducer_rows, [(source, s, keys, per_sample) for s in samples], scheduler,
                            "feature axes", progress)
            reducer = FeatureReducer.fit(parts, spec.block_components)
        source.reducer = reducer
        source.scale_sets = scale_sets(store, samples[0].name, spec, reducer)
        return source

    @property
    def base_dim(self) -> int:
        """Width of the features without the context blocks (and the neighbour set)."""
        return self.spec.base_width(len(self.scale_sets))

    def subset(self, names: list[str]) -> "CacheSource":
        """The same source restricted to some samples (renumbered), with the same principal axes."""
        chosen = [s for s in self.samples if s.name in set(names)]
        check_trainable(chosen, self.data)
        return replace(self, samples=[replace(s, code=i) for i, s in enumerate(chosen)])

    def matrix(self, info: SampleInfo) -> SampleMatrix:
        sample = open_sample(info.path, elements=self.elements)
        store = FeatureStore(self.cache, create=False)
        nuclei = store.nuclei(sample, if_changed="raise")
        cell_ids = nuclei["cell_id"].to_numpy(np.int64)
        Y, measured = sample.expression_of(cell_ids)
        return SampleMatrix(info.name, cell_ids, nuclei[["y", "x"]].to_numpy(np.float64), sample.group_of(cell_ids),
                            measured, sample_features(store, info.name, self.spec, nuclei, self.reducer),
                            np.asarray(Y, dtype=np.float32))


def _reducer_rows(source: CacheSource, info: SampleInfo, keys: list, max_rows: int) -> dict[str, np.ndarray]:
    return FeatureReducer.subsample(FeatureStore(source.cache, create=False), info.name, keys, max_rows)


@dataclass
class ArraySource:
    """Per-sample matrices already in memory (a notebook's own features, a test's planted data).

    `base_dim`: how many leading columns the models without context read (default: all of them).
    """

    matrices: list[SampleMatrix]
    genes: list[str]
    base_dim: int | None = None
    scale_sets: np.ndarray | None = None
    feature_settings: dict = field(default_factory=dict)
    reducer: FeatureReducer | None = None
    samples: list[SampleInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.samples = []
        for matrix in self.matrices:
            if matrix.Y.shape[1] != len(self.genes):
                raise ValueError(f"sample {matrix.name}: {matrix.Y.shape[1]} expression columns, {len(self.genes)} genes")
            if matrix.measured.any():
                measured = np.asarray(matrix.measured, bool)
                self.samples.append(SampleInfo(matrix.name, len(self.samples),
                                               int((measured & (matrix.group == "train")).sum()),
                                               int((measured & (matrix.group == "validation")).sum())))
        check_trainable(self.samples, "(arrays)")
        if self.base_dim is None:
            self.base_dim = self.matrices[0].X.shape[1]

    def subset(self, names: list[str]) -> "ArraySource":
        return ArraySource([m for m in self.matrices if m.name in set(names)], self.genes, self.base_dim,
                           self.scale_sets, self.feature_settings, self.reducer)

    def matrix(self, info: SampleInfo) -> SampleMatrix:
        return next(m for m in self.matrices if m.name == info.name)


Source = CacheSource | ArraySource
