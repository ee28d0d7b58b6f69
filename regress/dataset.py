"""All nuclei of all samples as aligned arrays: features, measured expression, group, position, sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from regress.features import FeatureReducer, FeatureSpec, sample_features
from slidedata.errors import DataError
from slidedata.feature_store import FeatureStore
from slidedata.sample import HELD_OUT_GROUPS, Sample


@dataclass
class NucleusTable:
    sample: np.ndarray  # (n,) sample name
    cell_id: np.ndarray  # (n,) int64
    group: np.ndarray  # (n,) 'train' | 'validation' | 'test' | 'unassigned'
    coords: np.ndarray  # (n, 2) centroid (y, x) in px
    X: np.ndarray  # (n, f) float32 features
    Y: np.ndarray  # (n, g) float32 measured log1p expression, NaN rows where unmeasured
    measured: np.ndarray  # (n,) bool
    genes: list[str]
    # How the features were embedded ('encoder:patch_size' -> settings), the same for every sample; saved with
    # the model so prediction can refuse features made otherwise.
    feature_settings: dict[str, dict] = field(default_factory=dict)
    column_groups: np.ndarray | None = None  # per column of X, see regress.features.column_groups

    def groups_of(self, inputs: np.ndarray) -> np.ndarray | None:
        """The column groups of a model's inputs (a leading slice of X's columns); None for other inputs."""
        if self.column_groups is None or inputs.shape[1] > len(self.column_groups):
            return None
        return self.column_groups[: inputs.shape[1]]

    def __len__(self) -> int:
        return len(self.cell_id)

    def rows(self, index: np.ndarray) -> "NucleusTable":
        return NucleusTable(self.sample[index], self.cell_id[index], self.group[index], self.coords[index],
                            self.X[index], self.Y[index], self.measured[index], self.genes, self.feature_settings,
                            self.column_groups)

    @property
    def held_out(self) -> np.ndarray:
        return np.isin(self.group, HELD_OUT_GROUPS)

    def spatial_blocks(self, n_blocks: int = 4) -> np.ndarray:
        """Integer block label per nucleus: each sample's extent cut into n_blocks x n_blocks squares."""
        codes, _ = pd.factorize(self.sample)
        labels = np.empty(len(self), dtype=np.int64)
        for code in np.unique(codes):
            idx = codes == code
            labels[idx] = spatial_blocks(self.coords[idx], code, n_blocks)
        return labels


def spatial_blocks(coords: np.ndarray, code: int, n_blocks: int) -> np.ndarray:
    """Block label of each nucleus of one sample (`code`: its index among the samples): the extent of all its nuclei
    cut into n_blocks x n_blocks squares; labels of different samples never meet."""
    lo, hi = coords.min(0), coords.max(0) + 1e-6
    cell = np.floor((coords - lo) / (hi - lo) * n_blocks).astype(np.int64)
    return (code * n_blocks + cell[:, 0]) * n_blocks + cell[:, 1]


def load_table(samples: list[Sample], store: FeatureStore, spec: FeatureSpec,
               genes: list[str] | None = None, reducer: FeatureReducer | None = None) -> NucleusTable:
    """Concatenate every sample's cached nuclei with their features and (where measured) expression."""
    genes = genes if genes is not None else next((s.genes for s in samples if s.has_expression), None)
    if genes is None:
        raise DataError(samples[0].path.parent, "anucleus", "no sample has measured expression to learn from")
    parts, settings = [], None
    for sample in samples:
        nuclei = store.nuclei(sample, if_changed="raise")
        cell_ids = nuclei["cell_id"].to_numpy(np.int64)
        if sample.has_expression and sample.genes != genes:
            raise DataError(sample.path, "anucleus", "genes differ from the other samples' (names or order)")
        # One model, one way of embedding: features of samples embedded otherwise are not comparable.
        if settings is None:
            settings = store.settings(sample.name, spec.keys)
        else:
            store.check_settings(sample.name, settings, than=f"those of {samples[0].name}",
                                 remedy="embed all samples alike")
        Y, measured = sample.expression_of(cell_ids) if sample.has_expression else (
            np.full((len(cell_ids), len(genes)), np.nan, np.float32), np.zeros(len(cell_ids), bool))
        parts.append(NucleusTable(
            sample=np.full(len(cell_ids), sample.name, dtype=object), cell_id=cell_ids,
            group=sample.group_of(cell_ids), coords=nuclei[["y", "x"]].to_numpy(np.float64),
            X=sample_features(store, sample.name, spec, nuclei, reducer), Y=Y, measured=measured, genes=genes,
        ))
    table = NucleusTable(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                           ("sample", "cell_id", "group", "coords", "X", "Y", "measured")), genes=genes,
                         feature_settings=settings)
    if not (table.measured & (table.group == "train")).any():
        raise DataError(samples[0].path.parent, "cell_id-group",
                        f"no training nuclei: none of the {len(samples)} sample(s) has a nucleus in group 'train' "
                        "with measured expression, so there is nothing to learn from")
    return table

